"""The ctypes declarations in llama_lib/_bindings.py agree with the fetched llama.h.

A C probe is generated from the tables in _bindings (STRUCTS and every function table),
compiled with the machine's `cc` against `.llama/include` and run. It prints, for every structure,
sizeof/alignof and every field's offsetof/sizeof/type class; for every function, the size and class
of its return type and of each parameter type (the types are cut out of the header's prototype).
Python then compares those numbers with what ctypes computes. Any field added, removed, reordered
or retyped in llama.h (a version bump) makes these tests fail.

The argument-count test only parses the header text and needs no compiler.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from functools import lru_cache

import pytest

from llama_lib import _bindings as B
from llama_lib.loader import FETCH_DIR

INCLUDE_DIR = FETCH_DIR / "include"
LLAMA_H = INCLUDE_DIR / "llama.h"
GGML_BACKEND_H = INCLUDE_DIR / "ggml-backend.h"
GGML_H = INCLUDE_DIR / "ggml.h"
GGML_CPU_H = INCLUDE_DIR / "ggml-cpu.h"

# (table, header, export macro) for every function table in _bindings.
FUNCTION_TABLES = [
    (B.LLAMA_FUNCTIONS, LLAMA_H, "LLAMA_API"),
    (B.GGML_FUNCTIONS, GGML_BACKEND_H, "GGML_API"),
    (B.GGML_BASE_FUNCTIONS, GGML_H, "GGML_API"),
    (B.GGML_CPU_FUNCTIONS, GGML_CPU_H, "GGML_BACKEND_API"),
]
ALL_FUNCTIONS = [(name, header, macro) for table, header, macro in FUNCTION_TABLES for name in table]


def _fn_spec(name: str):
    return next(table[name] for table, _, _ in FUNCTION_TABLES if name in table)


# GCC's __builtin_classify_type codes (typeclass.h). In C, bool and enums classify as integers.
CLS_INTEGER, CLS_POINTER, CLS_REAL, CLS_RECORD, CLS_UNION = 1, 5, 8, 12, 13


# --- header parsing ----------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _header_text(path) -> str:
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash scripts/fetch_llama.sh`")
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_prototype(path, macro: str, name: str) -> tuple[str, list[str]] | None:
    """(return type text, [parameter declaration texts]) of `macro <ret> name(...);`, or None."""
    text = _header_text(path)
    m = re.search(rf"\b{macro}\s+([^;{{}}()]*?)\b{re.escape(name)}\s*\(", text)
    if m is None:
        return None
    ret = " ".join(m.group(1).split())
    i, depth = m.end(), 1  # just after the opening parenthesis
    start = i
    while depth:
        ch = text[i]
        depth += ch == "("
        depth -= ch == ")"
        i += 1
    inner = " ".join(text[start : i - 1].split())
    if inner in ("", "void"):
        return ret, []
    return ret, _split_top_level(inner)


_QUALIFIERS = {"const", "volatile", "struct", "enum", "union", "unsigned", "signed"}


def param_type(decl: str) -> str:
    """The type part of a parameter declaration ('const char * text' -> 'const char *')."""
    decl = decl.strip()
    m = re.match(r"^(.*?)(\w+)\s*(\[\s*\])?$", decl, flags=re.S)
    assert m, decl
    head, last, array = m.group(1).strip(), m.group(2), m.group(3)
    words = [w for w in re.findall(r"\w+", head) if w not in _QUALIFIERS]
    if head.endswith("*") or words:  # `last` is the parameter's name
        return head + (" *" if array else "")
    return decl  # unnamed parameter: the whole text is the type


def header_struct_fields(cname: str) -> list[tuple[str, str, bool]]:
    """(field name, C type text, in an anonymous union) of `struct NAME { ... }` in llama.h
    (or ggml.h, which it includes), in declaration order. Crude, but enough for their plain
    declarations."""
    tag = cname.split()[-1]
    for header in (LLAMA_H, GGML_H):
        text = _header_text(header)
        m = re.search(rf"\bstruct\s+{tag}\s*\{{", text)
        if m:
            break
    assert m, f"struct {tag} {{ not found in llama.h or ggml.h"
    i, depth = m.end(), 1
    start = i
    while depth:
        depth += (text[i] == "{") - (text[i] == "}")
        i += 1
    return _fields_of_body(text[start : i - 1], in_union=False)


def _fields_of_body(body: str, in_union: bool) -> list[tuple[str, str, bool]]:
    out, depth, cur = [], 0, []
    decls = []
    for ch in body:
        depth += (ch == "{") - (ch == "}")
        if ch == ";" and depth == 0:
            decls.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    for d in decls:
        d = " ".join(d.split())
        if not d:
            continue
        if re.match(r"^union\s*\{", d):  # anonymous union: its members are the struct's
            inner = d[d.index("{") + 1 : d.rindex("}")]
            out += _fields_of_body(inner, in_union=True)
            continue
        fp = re.match(r"^(.*)\(\s*\*\s*(\w+)\s*\)\s*\(.*\)$", d)
        if fp:  # function pointer member
            out.append((fp.group(2), d, in_union))
            continue
        m = re.match(r"^(.*?)(\w+)\s*((?:\[[^\]]*\])*)$", d)
        assert m and "," not in d, f"cannot parse struct member declaration {d!r}"
        out.append((m.group(2), (m.group(1) + m.group(3)).strip(), in_union))
    return out


# --- ctypes side -------------------------------------------------------------------------------


def ctypes_kind(t) -> dict:
    """What a C probe should report for a ctypes type: class code, size, bool/signed flags."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return {"cls": {CLS_RECORD}, "size": ctypes.sizeof(t)}
    if isinstance(t, type) and issubclass(t, ctypes.Union):
        return {"cls": {CLS_UNION}, "size": ctypes.sizeof(t)}
    if isinstance(t, type) and issubclass(t, ctypes.Array):  # decays to a pointer in expressions
        return {"cls": {CLS_POINTER}, "size": ctypes.sizeof(t)}
    if t in (ctypes.c_void_p, ctypes.c_char_p) or (
        isinstance(t, type) and issubclass(t, (ctypes._Pointer, ctypes._CFuncPtr))
    ):
        return {"cls": {CLS_POINTER}, "size": ctypes.sizeof(ctypes.c_void_p)}
    code = t._type_
    if code in "fd":
        return {"cls": {CLS_REAL}, "size": ctypes.sizeof(t), "bool": 0}
    if code == "?":
        return {"cls": {CLS_INTEGER}, "size": 1, "bool": 1}
    assert code in "bBhHiIlLqQ", (t, code)
    return {"cls": {CLS_INTEGER}, "size": ctypes.sizeof(t), "bool": 0, "signed": int(code.islower())}


def pointee_size(t) -> int | None:
    """sizeof the pointed-to type for typed pointers (None for void*/callbacks: opaque)."""
    if t is ctypes.c_char_p:
        return 1
    if isinstance(t, type) and issubclass(t, ctypes._Pointer):
        return ctypes.sizeof(t._type_)
    return None


# --- the probe ---------------------------------------------------------------------------------

_PROBE_HEAD = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdbool.h>
#include "llama.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#define ISBOOL(x) _Generic((x), _Bool: 1, default: 0)
#define ISSIGNED(x) _Generic((x), signed char: 1, short: 1, int: 1, long: 1, long long: 1, default: 0)
/* one line per type: tag, size, type class, is-bool, is-signed */
#define TYPE(tag, T) printf("%s|%zu %d %d %d\n", tag, sizeof(T), \
    (int)__builtin_classify_type(*(T *)0), ISBOOL(*(T *)0), ISSIGNED(*(T *)0))
#define FIELD(tag, S, f) printf("%s|%zu %zu %d %d %d\n", tag, offsetof(S, f), \
    sizeof(((S *)0)->f), (int)__builtin_classify_type(((S *)0)->f), ISBOOL(((S *)0)->f), \
    ISSIGNED(((S *)0)->f))

int main(void) {
"""


def _member_list(cls):
    """(ctypes field name, C member name to probe, ctypes type) for each field of a struct.
    An anonymous union field is probed through its first member (same offset); its members,
    which ctypes promotes onto the struct, are probed one by one."""
    out = []
    anon = set(getattr(cls, "_anonymous_", ()))
    for fname, ftype, *_ in cls._fields_:
        if fname in anon:
            out.append((fname, ftype._fields_[0][0], None))
            for mname, mtype, *_ in ftype._fields_:
                out.append((mname, mname, mtype))
        else:
            out.append((fname, fname, ftype))
    return out


def _c_pointer_type(c_text: str) -> bool:
    return "*" in c_text and "(" not in c_text  # a data pointer, not a function pointer


def build_probe() -> str:
    lines = [_PROBE_HEAD]
    for cname, cls in B.STRUCTS.items():
        key = cname.replace(" ", "_")
        c_fields = {n: t for n, t, _ in header_struct_fields(cname)}
        lines.append(f'  printf("S {key}|%zu %zu\\n", sizeof({cname}), _Alignof({cname}));')
        for fname, member, ftype in _member_list(cls):
            if member not in c_fields:
                continue  # reported by test_struct_field_names
            lines.append(f'  FIELD("F {key} {fname}", {cname}, {member});')
            if ftype is not None and pointee_size(ftype) is not None and _c_pointer_type(c_fields[member]):
                lines.append(f'  printf("P {key} {fname}|%zu\\n", sizeof(*((({cname} *)0)->{member})));')
    for name, header, macro in ALL_FUNCTIONS:
        proto = parse_prototype(header, macro, name)
        if proto is None:
            continue  # reported by test_function_declared_in_header
        ret, params = proto
        restype, argtypes = _fn_spec(name)
        if ret != "void":
            lines.append(f'  TYPE("R {name}", {ret});')
            if pointee_size(restype) is not None and _c_pointer_type(ret):
                lines.append(f'  printf("Q {name} ret|%zu\\n", sizeof(**({ret} *)0));')
        for i, p in enumerate(params):
            t = param_type(p)
            lines.append(f'  TYPE("A {name} {i}", {t});')
            if i < len(argtypes) and pointee_size(argtypes[i]) is not None and _c_pointer_type(t):
                lines.append(f'  printf("Q {name} {i}|%zu\\n", sizeof(**({t} *)0));')
    lines.append("  return 0;\n}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[tuple[str, ...], tuple[int, ...]]:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (`cc`) on PATH: cannot compile the ABI probe")
    if not LLAMA_H.is_file():
        pytest.fail(f"{LLAMA_H} is missing: run `bash scripts/fetch_llama.sh`")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "probe.c", d / "probe"
    src.write_text(build_probe())
    r = subprocess.run([cc, "-std=gnu11", "-w", f"-I{INCLUDE_DIR}", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"probe did not compile:\n{r.stderr[-4000:]}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        key, _, values = line.partition("|")
        table[tuple(key.split())] = tuple(int(x) for x in values.split())
    return table


# --- tests: structures -------------------------------------------------------------------------


@pytest.mark.parametrize("cname", list(B.STRUCTS))
def test_struct_field_names(cname):
    """The ctypes fields are the header's fields, same names, same order, none missing
    (a missing trailing bool would hide in padding and not change the size)."""
    cls = B.STRUCTS[cname]
    c_names = [n for n, _, _ in header_struct_fields(cname)]
    py_names = [member if ftype is not None else None for _, member, ftype in _member_list(cls)]
    py_names = [n for n in py_names if n is not None]
    assert py_names == c_names


@pytest.mark.parametrize("cname", list(B.STRUCTS))
def test_struct_layout(probe, cname):
    cls = B.STRUCTS[cname]
    key = cname.replace(" ", "_")
    c_types = {n: t for n, t, _ in header_struct_fields(cname)}
    size, align = probe[("S", key)]
    assert ctypes.sizeof(cls) == size, f"sizeof({cname}): C {size}, ctypes {ctypes.sizeof(cls)}"
    assert ctypes.alignment(cls) == align, f"alignof({cname}): C {align}, ctypes {ctypes.alignment(cls)}"
    problems = []
    for fname, member, ftype in _member_list(cls):
        if ("F", key, fname) not in probe:
            problems.append(f"{fname}: no such member in C")
            continue
        off, fsize, fcls, fbool, fsigned = probe[("F", key, fname)]
        if getattr(cls, fname).offset != off:
            problems.append(f"{fname}: offset C {off}, ctypes {getattr(cls, fname).offset}")
        if ftype is None:  # the anonymous union itself: its offset is what matters
            continue
        want = ctypes_kind(ftype)
        if want["size"] != fsize or getattr(cls, fname).size != fsize:
            problems.append(f"{fname}: size C {fsize}, ctypes {want['size']}")
        if fcls not in want["cls"]:
            problems.append(f"{fname}: C type class {fcls}, ctypes {ftype.__name__} expects {want['cls']}")
        if "bool" in want and want["bool"] != fbool:
            problems.append(f"{fname}: C is_bool={fbool}, ctypes {ftype.__name__}")
        if "signed" in want and not fbool and "enum" not in c_types[member] and want["signed"] != fsigned:
            problems.append(f"{fname} ({c_types[member]}): C signed={fsigned}, ctypes {ftype.__name__}")
        ps = pointee_size(ftype)
        if ps is not None:
            got = probe.get(("P", key, fname))
            if got != (ps,):
                problems.append(f"{fname} ({c_types[member]}): pointee size C {got}, ctypes {ps}")
    assert not problems, f"{cname}:\n  " + "\n  ".join(problems)


# --- tests: functions --------------------------------------------------------------------------


@pytest.mark.parametrize("name,header,macro", ALL_FUNCTIONS, ids=[f[0] for f in ALL_FUNCTIONS])
def test_function_declared_in_header(name, header, macro):
    text = _header_text(header)
    assert re.search(rf"\b{re.escape(name)}\s*\(", text), f"{name}( not found in {header.name}"
    assert parse_prototype(header, macro, name) is not None, f"no `{macro} ... {name}(` in {header.name}"


@pytest.mark.parametrize("name,header,macro", ALL_FUNCTIONS, ids=[f[0] for f in ALL_FUNCTIONS])
def test_function_argument_count(name, header, macro):
    proto = parse_prototype(header, macro, name)
    assert proto is not None, f"{name} is not declared in {header.name}"
    _, params = proto
    _, argtypes = _fn_spec(name)
    assert len(argtypes) == len(params), (
        f"{name}: header has {len(params)} parameters {params}, ctypes argtypes has {len(argtypes)}"
    )


@pytest.mark.parametrize("name,header,macro", ALL_FUNCTIONS, ids=[f[0] for f in ALL_FUNCTIONS])
def test_function_types(probe, name, header, macro):
    """Return and parameter types match in size, class (int/float/pointer/struct), bool-ness and,
    for plain integers, signedness; typed pointers point to objects of the same size."""
    ret_c, params = parse_prototype(header, macro, name)
    restype, argtypes = _fn_spec(name)
    problems = []

    def compare(what, got, ctype, c_text):
        size, cls, is_bool, is_signed = got
        want = ctypes_kind(ctype)
        if want["size"] != size:
            problems.append(f"{what} ({c_text}): size C {size}, ctypes {want['size']}")
        if cls not in want["cls"]:
            problems.append(f"{what} ({c_text}): C type class {cls}, ctypes {ctype.__name__}")
        if "bool" in want and want["bool"] != is_bool:
            problems.append(f"{what} ({c_text}): C bool={is_bool}, ctypes {ctype.__name__}")
        # enums have implementation-defined signedness; compare only plain integer types
        if "signed" in want and not is_bool and "enum" not in c_text and want["signed"] != is_signed:
            problems.append(f"{what} ({c_text}): C signed={is_signed}, ctypes {ctype.__name__}")
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            c_name = re.findall(r"\w+", c_text)[-1]
            if c_name != ctype.__name__:
                problems.append(f"{what}: C struct {c_name}, ctypes {ctype.__name__}")

    if ret_c == "void":
        if restype is not None:
            problems.append(f"returns void in C, ctypes restype {restype}")
    elif restype is None:
        problems.append(f"returns {ret_c} in C, ctypes restype None")
    else:
        compare("return", probe[("R", name)], restype, ret_c)
        ps = pointee_size(restype)
        if ps is not None and probe.get(("Q", name, "ret")) != (ps,):
            problems.append(f"return ({ret_c}): pointee size C {probe.get(('Q', name, 'ret'))}, ctypes {ps}")
    for i, (p, t) in enumerate(zip(params, argtypes)):
        compare(f"arg {i}", probe[("A", name, str(i))], t, param_type(p))
        ps = pointee_size(t)
        if ps is not None and probe.get(("Q", name, str(i))) != (ps,):
            problems.append(f"arg {i} ({p}): pointee size C {probe.get(('Q', name, str(i)))}, ctypes {ps}")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_probe_sees_the_pinned_header():
    """The header in the fetch folder is the one the bindings were written for."""
    text = LLAMA_H.read_text()
    # fields that only the v0.5.0 header has (see the runtime notes)
    for field in ("load_mode", "lazy_mode", "n_rs_seq", "n_outputs_max_per_seq", "ctx_other"):
        assert re.search(rf"\b{field}\s*;", text), field
