"""The Qwen chat templates (Jinja), as the Qwen3 and Qwen3.5 chat checkpoints ship them in
`tokenizer_config.json`: ChatML turns, tool definitions in the system turn, tool results in a
user turn as `<tool_response>` blocks, and `<think>` reasoning blocks shown for the assistant
turns after the last user query (earlier turns keep only their answer).

The two differ in the tool-call format (Qwen3: a JSON object inside `<tool_call>`; Qwen3.5: XML
`<function=NAME><parameter=KEY>` blocks) and in the generation prompt (Qwen3.5 opens a `<think>`
block unless `enable_thinking` is false; Qwen3 only writes an empty one when it is false).
Written from the templates' structure; `qwen_tokenizer(kind)` carries the matching one.
"""

from __future__ import annotations

_SYSTEM_AND_LAST_QUERY = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- TOOLS_PREAMBLE }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- TOOLS_POSTAMBLE }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == 'user' and message.content is string
      and not (message.content.startswith('<tool_response>')
               and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
{%- endif %}
{%- endfor %}
"""

_TURNS = """\
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if reasoning == '' and '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
TOOL_CALL
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
"""

_QWEN3_TOOL_CALL = """\
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}"""

_QWEN3_5_TOOL_CALL = """\
{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
{%- for key, value in (tool_call.arguments | items if tool_call.arguments is mapping else []) %}
{{- '<parameter=' + key + '>\\n' }}
{{- value if value is string else value | tojson }}
{{- '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}"""

_QWEN3_TOOLS = (
    ("'# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>'"),
    ("'\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n'"),
)
_QWEN3_5_TOOLS = (
    "'# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>'",
    ("'\\n</tools>\\n\\nIf you choose to call a function ONLY reply in the following format with "
    "NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>"
    "\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call><|im_end|>\\n'"),
)

_QWEN3_PROMPT = """\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
_QWEN3_5_PROMPT = """\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}
{%- else %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}"""


def _template(tools: tuple[str, str], tool_call: str, prompt: str) -> str:
    head = _SYSTEM_AND_LAST_QUERY.replace("TOOLS_PREAMBLE", tools[0]).replace(
        "TOOLS_POSTAMBLE", tools[1])
    return head + _TURNS.replace("TOOL_CALL", tool_call) + prompt


QWEN3_TEMPLATE = _template(_QWEN3_TOOLS, _QWEN3_TOOL_CALL, _QWEN3_PROMPT)
QWEN3_5_TEMPLATE = _template(_QWEN3_5_TOOLS, _QWEN3_5_TOOL_CALL, _QWEN3_5_PROMPT)
TEMPLATES = {"qwen3": QWEN3_TEMPLATE, "qwen3.5": QWEN3_5_TEMPLATE}
