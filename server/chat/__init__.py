"""Chat: messages to a prompt through the server's template (templates, render, special_text),
a request's tools and reasoning as a plan (plan, tool_formats, reasoning), and the answer read
back as it grows (output, json_scan). No model and no HTTP here: the vocabulary comes in."""
