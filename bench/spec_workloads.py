"""The three workloads of bench/speculative_vs_cpp.py (issue 34), as (shared prefix, tail) pairs:
the prefix (the function, the document, the chat opening) is the same for every request of a
workload, so a warm-up puts it in every slot's cache; the tail differs per request (a variant
number), so no answer is one the server has written before: a repeated greedy answer would be
drafted from memory by ngram-mod, or by any table shared across requests, and measure nothing.

- `code`: a ~360-token function returned with one parameter renamed (the answer repeats most of
  the prompt);
- `quote`: two passages of a short document quoted word for word;
- `chat`: free text with little repetition: a story to continue, sampled (temperature 0.8,
  a seed per request). The default model is a base model: it answers a chat question by
  repeating the question, and greedy text of its own falls into loops within 128 tokens,
  which every n-gram drafter then drafts at 100 % (measured: a greedy story at 8 clients).
"""

from __future__ import annotations

FUNC = '''def summarize_orders(orders, currency="EUR", include_tax=True):
    """Group a list of order dicts by customer and total them."""
    totals = {}
    counts = {}
    for order in orders:
        customer = order.get("customer", "unknown")
        amount = float(order.get("amount", 0.0))
        if include_tax:
            amount = amount * (1.0 + float(order.get("tax_rate", 0.0)))
        if order.get("currency", currency) != currency:
            rate = float(order.get("rate", 1.0))
            amount = amount * rate
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
    result = []
    for customer, total in totals.items():
        average = total / counts[customer] if counts[customer] else 0.0
        result.append({
            "customer": customer,
            "total": round(total, 2),
            "orders": counts[customer],
            "average": round(average, 2),
            "currency": currency,
        })
    result.sort(key=lambda row: row["total"], reverse=True)
    return result


def top_customers(orders, n=3, currency="EUR"):
    """The n customers with the largest totals."""
    rows = summarize_orders(orders, currency=currency)
    return [row["customer"] for row in rows[:n]]
'''
DOC = ("The lighthouse at Kerrow Point was built in 1841 by the harbour board after three ships "
       "were lost on the reef in a single winter. Its tower is twenty-six metres tall and made of "
       "granite quarried on the island. The first keeper, Thomas Abel, kept a log of every ship "
       "that passed for thirty-one years. In 1923 the oil lamp was replaced by an electric one, "
       "and in 1987 the light was automated and the last keepers left. Today the keeper's cottage "
       "is a small museum that shows the log books, the old lens and photographs of the wrecks.")
TOPICS = ("the keepers", "the museum", "the tower", "the lamp", "the wrecks", "the log books",
          "the harbour board", "the granite", "the first keeper", "the automation")
NAMES = ("with_tax", "add_tax", "taxed", "apply_tax", "use_tax", "tax_on", "plus_tax", "gross",
         "tax_included", "incl_tax", "count_tax", "want_tax", "has_tax", "tax_flag", "do_tax", "add_vat")
SHOPS = ("bakery", "bookshop", "cafe", "bike repair shop", "flower shop", "toy store", "tea room",
         "pottery studio", "fish market", "ice cream parlour")
PLACES = ("a seaside town", "a mountain village", "a busy city street", "a university town",
          "an old harbour", "a ski resort")
N_PREDICT = {"code": 320, "quote": 128, "chat": 128}


def sampling(workload: str, k: int) -> dict:
    """Request k's sampling fields: greedy, but chat samples (seeded, so both servers get the
    same request)."""
    return {"temperature": 0.8, "seed": 1000 + k} if workload == "chat" else {"temperature": 0}


def prompt(workload: str, k: int) -> str:
    """Request k's prompt (k = 0, 1, ...: each a different tail; -1: the warm-up's)."""
    if workload == "code":
        name = NAMES[k % len(NAMES)] + ("" if k < len(NAMES) else str(k // len(NAMES)))
        head = f"User:\nHere is a Python function:\n\n{FUNC}\nReturn the whole code again with one change: "
        tail = "fix nothing." if k < 0 else f"rename the parameter include_tax to {name} everywhere."
        return head + tail + "\nAssistant:\n```python\n"
    if workload == "quote":
        n = len(TOPICS)
        a, b = (0, 0) if k < 0 else (k % n, (k % n + 1 + (k // n) % (n - 1)) % n)
        tail = "Say hello." if k < 0 else (f"Quote the passages of the document about {TOPICS[a]} and "
                                           f"about {TOPICS[b]}, word for word.")
        return f"Document:\n{DOC}\n\nUser:\n{tail}\nAssistant:\n"
    shop, place = ("shop", "a town") if k < 0 else (SHOPS[k % len(SHOPS)], PLACES[(k // len(SHOPS)) % len(PLACES)])
    # the base model answers a chat question by repeating it; a story goes on with little repetition
    return f"Once upon a time, in {place}, there was a {shop} owner named"
