"""Chat formats: Meta's Llama 3.1 dialog format with tool calling, and Jinja chat templates for other vocabularies.

Llama 3.1 (:class:`ChatFormat`; reference ``llama_models/llama3/chat_format.py`` and
``llama_models/llama3_1/prompt_format.md`` in llama-models 0.3.0)::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>brave_search.call(query="...")<|eom_id|>
    <|start_header_id|>ipython<|end_header_id|>\\n\\n{tool result}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

Messages are plain dicts: ``{"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": str,
"tool_calls": [{"name": str, "arguments": dict}], "stop_reason": "end_of_turn"|"end_of_message"}`` (the last two
optional, assistant only). The tool role is written ``ipython`` in the header. An assistant message with tool calls
ends in ``<|eom_id|>`` (the call awaits its result) unless ``stop_reason`` says ``end_of_turn``; any other message
ends in ``<|eot_id|>``. Message content is always encoded as plain text: ``"<|eot_id|>"`` typed by a user is never
token 128009.

Tool calls are rendered as the reference does: built-in tools (brave_search, wolfram_alpha, photogen) as
``<|python_tag|>name.call(query="...")``, code_interpreter as ``<|python_tag|>`` + raw code, custom tools as JSON
``{"type": "function", "name": ..., "parameters": {...}}`` (or ``<function=NAME>{...}</function>`` / a Python list,
by ``tool_prompt_format``). Deviation from the reference's ``encode_message``: it writes ``<|python_tag|>`` only before
code_interpreter calls; here built-in calls get it too, as the model emits them (prompt_format.md, "Builtin Tool
Calling").

:func:`parse_output` turns model output back into a :class:`Message` holding plain content or tool calls; it
never raises on model output.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BUILTIN_TOOLS",
    "ToolCall",
    "Message",
    "ChatFormat",
    "TemplateChatFormat",
    "chat_format_for",
    "system_preamble",
    "system_message",
    "load_tools",
    "parse_output",
    "normalize_tool_definition",
    "validate_messages",
]

# Built-in tools of Llama 3.1 (llama_models/datatypes.py BuiltinTool). photogen is rendered but not offered by
# system_preamble / load_tools (Llama 3.1 was not trained to announce it).
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
_ROLES = ("system", "user", "assistant", "tool", "ipython")
_TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")

PYTHON_TAG = "<|python_tag|>"
_END_TOKENS = {"<|eot_id|>": "end_of_turn", "<|eom_id|>": "end_of_message", "<|end_of_text|>": "end_of_turn"}
_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@dataclasses.dataclass
class ToolCall:
    """One parsed or requested tool call: ``name`` and keyword ``arguments`` (JSON-able dict)."""

    name: str
    arguments: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


@dataclasses.dataclass
class Message:
    """A parsed assistant message: plain ``content`` and/or ``tool_calls``.

    ``stop_reason`` is ``"end_of_turn"`` (eot), ``"end_of_message"`` (eom: a tool call awaits its result) or None
    when the text carried no end token. ``to_dict()`` gives the message dict that :class:`ChatFormat` encodes.
    """

    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    role: str = "assistant"
    stop_reason: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [t.to_dict() for t in self.tool_calls]
        if self.stop_reason is not None:
            d["stop_reason"] = self.stop_reason
        return d


# ----------------------------------------------------------------------------------------------------------------
# Tool definitions and the system preamble
# ----------------------------------------------------------------------------------------------------------------


def normalize_tool_definition(tool: Any, where: str = "tool") -> dict:
    """A custom tool definition -> ``{"type": "function", "function": {"name", "description", "parameters"}}``.

    Accepts that wrapped form or a bare ``{"name", "description", "parameters"}`` dict.
    Raises ValueError naming ``where`` when it is not a dict with a non-empty string ``name``.
    """
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: a tool definition must be a JSON object, got {type(tool).__name__}")
    fn = tool.get("function") if tool.get("type") == "function" or "function" in tool else tool
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where}: 'function' must be a JSON object")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: a tool definition needs a non-empty string 'name' (got {name!r})")
    params = fn.get("parameters", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: tool {name!r}: 'parameters' must be a JSON object")
    out = {"name": name}
    if "description" in fn:
        out["description"] = fn["description"]
    out["parameters"] = dict(params)
    return {"type": "function", "function": out}


def _split_tools(tools: Iterable[Any] | None) -> tuple[list[dict], list[str]]:
    custom, builtin = [], []
    for i, t in enumerate(tools or ()):
        if isinstance(t, str):
            if t not in BUILTIN_TOOLS:
                raise ValueError(f"tools[{i}]: unknown built-in tool {t!r}; expected one of {list(BUILTIN_TOOLS)}")
            builtin.append(t)
        else:
            custom.append(normalize_tool_definition(t, f"tools[{i}]"))
    return custom, builtin


def system_preamble(
    date: datetime.date | None = None,
    tools: Sequence[Any] | None = None,
    builtin_tools: Sequence[str] = ("brave_search", "wolfram_alpha"),
    code_interpreter: bool = False,
) -> str:
    """The Llama 3.1 system-prompt preamble (prompt_format.md; prepend it to the system message's text).

    Lines: ``Environment: ipython`` when any tool is on (code_interpreter alone is enabled by this line),
    ``Tools: brave_search, wolfram_alpha`` for the query tools, ``Cutting Knowledge Date: December 2023``,
    ``Today Date: 26 Jul 2024`` (``date``; None means today), then, for custom tools, the instruction to answer with
    JSON function calls followed by each definition as indented JSON.

    Args:
      date: the date written on the "Today Date" line (``%d %b %Y``).
      tools: custom tool definitions (dicts, see :func:`normalize_tool_definition`); string entries are built-in
        tool names, added to ``builtin_tools`` (so ``tools=load_tools(spec), builtin_tools=()`` works).
      builtin_tools: names among brave_search, wolfram_alpha, code_interpreter.
      code_interpreter: turn on code_interpreter ("Environment: ipython" with no Tools entry for it).
    Returns: str ending in a newline.
    Raises: ValueError naming an unknown built-in tool or a malformed definition.
    """
    custom, extra = _split_tools(tools)
    names = []
    for i, b in enumerate(list(builtin_tools) + extra):
        if b not in BUILTIN_TOOLS:
            raise ValueError(f"builtin_tools[{i}]: unknown built-in tool {b!r}; expected one of {list(BUILTIN_TOOLS)}")
        if b == "code_interpreter":
            code_interpreter = True
        elif b not in names:
            names.append(b)
    date = date or datetime.date.today()
    lines = []
    if names or custom or code_interpreter:
        lines.append("Environment: ipython")
    if names:
        lines.append("Tools: " + ", ".join(names))
    lines.append("Cutting Knowledge Date: December 2023")
    lines.append("Today Date: " + date.strftime("%d %b %Y"))
    text = "\n".join(lines) + "\n"
    if custom:
        # Zero-shot JSON tool calling (prompt_format.md, "JSON based tool calling").
        text += (
            "\nAnswer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
        )
        text += "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n" for t in custom)
        text += "Return function calls in JSON format.\n"
    return text


def system_message(text: str = "", **preamble_kwargs) -> dict:
    """``{"role": "system", "content": system_preamble(**preamble_kwargs) + "\\n" + text}`` (blank line between)."""
    pre = system_preamble(**preamble_kwargs)
    return {"role": "system", "content": pre + ("\n" + text if text else "")}


def load_tools(spec: str) -> list:
    """Parse a ``--tools`` value: comma-separated entries, each a JSON file of custom tool definitions (a list, a
    single definition, or ``{"tools": [...]}``) or a built-in name (brave_search, wolfram_alpha, code_interpreter).

    Returns: list of built-in names (str) and normalized custom definitions (dict), in order; pass it as
    ``system_preamble(tools=..., builtin_tools=())``.
    Raises: ValueError naming the bad entry (unknown name, missing file, bad JSON, malformed definition).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--tools: empty tool specification {spec!r}")
    out: list = []
    entries = [spec.strip()] if os.path.isfile(spec.strip()) else [e.strip() for e in spec.split(",")]
    for entry in entries:
        if not entry:
            raise ValueError(f"--tools: empty entry in {spec!r}")
        if os.path.isfile(entry):
            try:
                with open(entry, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"--tools: {entry}: not a readable JSON file ({e})") from e
            if isinstance(data, Mapping) and "tools" in data:
                data = data["tools"]
            items = data if isinstance(data, list) else [data]
            if not items:
                raise ValueError(f"--tools: {entry}: holds no tool definitions")
            for i, t in enumerate(items):
                out.append(normalize_tool_definition(t, f"--tools: {entry}[{i}]"))
        elif entry in BUILTIN_TOOLS:
            if entry not in out:
                out.append(entry)
        elif entry.endswith(".json") or os.sep in entry:
            raise ValueError(f"--tools: file {entry!r} not found")
        else:
            raise ValueError(
                f"--tools: unknown built-in tool {entry!r} (expected {', '.join(BUILTIN_TOOLS)} or a JSON file path)"
            )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Message validation and tool-call rendering
# ----------------------------------------------------------------------------------------------------------------


def _tool_calls_of(msg: Mapping, where: str) -> list[ToolCall]:
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where}: 'tool_calls' must be a list")
    out = []
    for j, c in enumerate(calls):
        if isinstance(c, ToolCall):
            out.append(c)
            continue
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}.tool_calls[{j}]: must be a dict with 'name' and 'arguments'")
        fn = c.get("function") if isinstance(c.get("function"), Mapping) else c  # HF/OpenAI style accepted
        name, args = fn.get("name"), fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.tool_calls[{j}]: 'arguments' is a string that is not JSON ({e})") from e
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.tool_calls[{j}]: needs a non-empty string 'name'")
        if not isinstance(args, Mapping):
            raise ValueError(f"{where}.tool_calls[{j}]: 'arguments' must be a dict")
        out.append(ToolCall(name, dict(args)))
    return out


def _content_text(msg: Mapping, where: str) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, Mapping) and c.get("type") == "text" for c in content):
        return "".join(c.get("text", "") for c in content)
    if isinstance(content, (dict, list)):  # e.g. a tool result given as JSON
        return json.dumps(content, ensure_ascii=False)
    raise ValueError(f"{where}: 'content' must be a str (got {type(content).__name__})")


def _check_message(msg: Any, where: str) -> tuple[str, str, list[ToolCall]]:
    if not isinstance(msg, Mapping):
        raise ValueError(f"{where}: a message must be a dict with 'role' and 'content', got {type(msg).__name__}")
    role = msg.get("role")
    if role not in _ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {list(_ROLES)}")
    calls = _tool_calls_of(msg, where)
    if calls and role != "assistant":
        raise ValueError(f"{where}: only assistant messages carry 'tool_calls' (role {role!r})")
    return role, _content_text(msg, where), calls


def validate_messages(messages: Any, where: str = "messages") -> None:
    """Checks a dialog the way every chat format encodes it; the one validator for generation and fine-tuning.

    A dialog is a non-empty list of dicts with a ``role`` among system, user, assistant, tool, ipython, a ``content``
    string (or text parts / JSON for tool results), and ``tool_calls`` only on assistant messages.

    Raises:
      ValueError naming ``where[i]`` and the bad field: not a list, an empty list, an unknown role, bad content or
        tool calls.
    """
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError(f"{where}: must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: empty dialog (no message)")
    for i, m in enumerate(messages):
        _check_message(m, f"{where}[{i}]")


def _py_str(v: str) -> str:
    # The reference writes name.call(query="{q}") verbatim; quotes/backslashes would break that, so escape them.
    return f'"{v}"' if '"' not in v and "\\" not in v and "\n" not in v else json.dumps(v, ensure_ascii=False)


def _py_value(v: Any) -> str:
    if isinstance(v, str):
        return _py_str(v)
    if isinstance(v, (bool, int, float)) or v is None:
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_py_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_py_value(k)}: {_py_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"tool-call argument of unsupported type {type(v).__name__}")


def render_tool_call(call: ToolCall, tool_prompt_format: str = "json") -> str:
    """The text of one assistant tool call (without ``<|python_tag|>``), as llama_models ToolUtils.encode_tool_call.

    Raises ValueError for a code_interpreter call without a string ``code`` or an unknown format.
    """
    if call.name in _QUERY_TOOLS:
        return f"{call.name}.call(" + ", ".join(f"{k}={_py_value(v)}" for k, v in call.arguments.items()) + ")"
    if call.name == "code_interpreter":
        code = call.arguments.get("code")
        if not isinstance(code, str):
            raise ValueError("code_interpreter tool call: 'arguments' needs a string 'code'")
        return code
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})
    if tool_prompt_format == "function_tag":
        return f"<function={call.name}>{json.dumps(call.arguments)}</function>"
    if tool_prompt_format == "python_list":
        args = ", ".join(f"{k}={_py_value(v)}" for k, v in call.arguments.items())
        return f"[{call.name}({args})]"
    raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}; expected one of {_TOOL_PROMPT_FORMATS}")


# ----------------------------------------------------------------------------------------------------------------
# Parsing model output
# ----------------------------------------------------------------------------------------------------------------

_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>\s]+)>(?P<args>.*?)</function>", re.DOTALL)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_MAX_PARSE_CHARS = 200_000


def _literal(node: ast.AST) -> Any:
    return ast.literal_eval(node)


def _parse_args_text(s: str) -> dict | None:
    s = s.strip()
    try:
        v = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        try:
            v = ast.literal_eval(s)
        except Exception:  # noqa: BLE001 - anything unparsable is "not a call"
            return None
    return dict(v) if isinstance(v, dict) and all(isinstance(k, str) for k in v) else None


def _json_sequence(s: str) -> list | None:
    """``{...}; {...}`` or ``{...}\n{...}`` (several JSON objects, as Llama 3.1 sometimes emits) -> list, else None."""
    dec, out, pos = json.JSONDecoder(), [], 0
    while pos < len(s):
        try:
            obj, pos = dec.raw_decode(s, pos)
        except (json.JSONDecodeError, RecursionError):
            return None
        out.append(obj)
        while pos < len(s) and s[pos] in " \t\r\n;,":
            pos += 1
    return out if len(out) > 1 else None


def _json_calls(s: str) -> list[ToolCall] | None:
    s = s.strip()
    if not s or s[0] not in "{[":
        return None
    try:
        v = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        v = _json_sequence(s)
        if v is None:
            return None
    items = v if isinstance(v, list) else [v]
    if not items:
        return None
    calls = []
    for obj in items:
        if not isinstance(obj, dict):
            return None
        fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
        if not (obj.get("type") == "function" or "name" in fn):
            return None
        name = fn.get("name")
        if "parameters" in fn:
            args = fn["parameters"]
        elif "arguments" in fn:
            args = fn["arguments"]
        else:
            return None
        if isinstance(args, str):
            args = _parse_args_text(args)
        if not isinstance(name, str) or not _NAME_RE.match(name) or not isinstance(args, dict):
            return None
        if name in _QUERY_TOOLS and "query" not in args and len(args) == 1:
            args = {"query": next(iter(args.values()))}  # as the reference: built-in called in custom format
        calls.append(ToolCall(name, args))
    return calls


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kwargs(call: ast.Call) -> dict | None:
    if call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        return {k.arg: _literal(k.value) for k in call.keywords}
    except Exception:  # noqa: BLE001
        return None


def _expr(s: str) -> ast.AST | None:
    try:
        tree = ast.parse(s.strip(), mode="eval")
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError (NUL), RecursionError, MemoryError
        return None
    return tree.body


def _python_list_calls(s: str) -> list[ToolCall] | None:
    node = _expr(s) if s.strip().startswith("[") else None
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for el in node.elts:
        if not isinstance(el, ast.Call):
            return None
        name, args = _dotted(el.func), _kwargs(el)
        if name is None or args is None:
            return None
        calls.append(ToolCall(name, args))
    return calls


def _builtin_call(s: str) -> list[ToolCall] | None:
    node = _expr(s)
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr != "call":
        return None
    name, args = _dotted(node.func.value), _kwargs(node)
    if name is None or args is None or not _NAME_RE.match(name):
        return None
    return [ToolCall(name, args)]


def _function_tags(s: str) -> tuple[list[ToolCall], str] | None:
    calls, rest, pos = [], [], 0
    for m in _FUNCTION_TAG.finditer(s):
        args = _parse_args_text(m.group("args"))
        if args is None or not _NAME_RE.match(m.group("name")):
            return None  # one malformed call: treat the whole output as text
        calls.append(ToolCall(m.group("name"), args))
        rest.append(s[pos : m.start()])
        pos = m.end()
    if not calls:
        return None
    rest.append(s[pos:])
    return calls, "".join(rest).strip()


def _parse(text: str) -> Message:
    s = text.strip(" ")
    if s.startswith(_ASSISTANT_HEADER):
        s = s[len(_ASSISTANT_HEADER) :]
    stop = None
    for tok, reason in _END_TOKENS.items():
        if s.rstrip().endswith(tok):
            s = s.rstrip()[: -len(tok)]
            stop = reason
            break
    prefix, body, tagged = "", s, False
    i = s.find(PYTHON_TAG)
    if i >= 0:
        prefix, body, tagged = s[:i].strip(), s[i + len(PYTHON_TAG) :], True
    if len(body) > _MAX_PARSE_CHARS:  # far larger than any tool call: plain content (or code when tagged)
        if tagged:
            return Message(prefix, [ToolCall("code_interpreter", {"code": body})], stop_reason=stop)
        return Message(s, stop_reason=stop)

    tags = _function_tags(body)
    if tags is not None:
        calls, rest = tags
        return Message((prefix + " " + rest).strip(), calls, stop_reason=stop)
    for finder in (_json_calls, _python_list_calls):
        calls = finder(body)
        if calls:
            return Message(prefix, calls, stop_reason=stop)
    if tagged or body.strip().endswith(")"):
        calls = _builtin_call(body)
        if calls:
            return Message(prefix, calls, stop_reason=stop)
    if tagged and body.strip():
        return Message(prefix, [ToolCall("code_interpreter", {"code": body})], stop_reason=stop)
    return Message(s.replace(PYTHON_TAG, "") if tagged else s, stop_reason=stop)


def parse_output(text: str) -> Message:
    """Model output text (decoded with special tokens) -> :class:`Message` of plain content or tool calls.

    Recognised (llama_models ToolUtils and prompt_format.md): ``<|python_tag|>name.call(query="...")`` (built-in),
    ``<|python_tag|>`` + code (code_interpreter, ``{"code": ...}``), JSON ``{"type": "function", "name": ...,
    "parameters": {...}}`` or ``{"name": ..., "parameters": {...}}`` (or a list of them), ``<function=NAME>{...}
    </function>``, and a Python list of keyword calls ``[f(a=1, b="x")]``. A leading assistant header and a trailing
    ``<|eot_id|>``/``<|eom_id|>``/``<|end_of_text|>`` are removed (giving ``stop_reason``). Anything malformed is
    returned as plain content. Never raises on a ``str``; TypeError for other types.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_output: expected str, got {type(text).__name__}")
    try:
        return _parse(text)
    except Exception:  # noqa: BLE001 - model output must never crash the caller
        return Message(text)


# ----------------------------------------------------------------------------------------------------------------
# Llama 3.1 format
# ----------------------------------------------------------------------------------------------------------------


class ChatFormat:
    """Meta's Llama 3.1 dialog format on a Llama 3 vocabulary (reference: llama_models/llama3/chat_format.py).

    Args:
      tokenizer: a :class:`llama_jax.tokenizer.Tokenizer` with the Llama 3 special tokens.
      tool_prompt_format: how custom tool calls are written back: "json" (reference default), "function_tag",
        "python_list".
    Raises: ValueError if the tokenizer lacks a Llama 3 special token.
    """

    def __init__(self, tokenizer, tool_prompt_format: str = "json"):
        missing = [
            t
            for t in (
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            )
            if t not in tokenizer.special_tokens
        ]
        if missing:
            raise ValueError(f"ChatFormat needs a Llama 3 tokenizer; {tokenizer!r} lacks {missing}")
        if tool_prompt_format not in _TOOL_PROMPT_FORMATS:
            raise ValueError(f"tool_prompt_format={tool_prompt_format!r}; expected one of {_TOOL_PROMPT_FORMATS}")
        self.tokenizer = tokenizer
        self.tool_prompt_format = tool_prompt_format
        st = tokenizer.special_tokens
        self._sp = {k: st[k] for k in st}
        self.stop_ids = frozenset(tokenizer.stop_ids) | {st["<|eot_id|>"], st["<|eom_id|>"]}

    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` ids; role "tool" is written "ipython"."""
        role = "ipython" if role == "tool" else role
        return (
            [self._sp["<|start_header_id|>"]]
            + self.tokenizer.encode(role)
            + [self._sp["<|end_header_id|>"]]
            + self.tokenizer.encode("\n\n")
        )

    def encode_message(self, message: Mapping, where: str = "message") -> list[int]:
        """One message: header, content (plain text), rendered tool calls, then eom (a call awaits its result)
        or eot. Returns list[int]. Raises ValueError naming the bad field."""
        role, content, calls = _check_message(message, where)
        toks = self.encode_header(role)
        if calls and (calls[0].name == "code_interpreter" or calls[0].name in _QUERY_TOOLS):
            toks.append(self._sp[PYTHON_TAG])
        if content:
            toks.extend(self.tokenizer.encode(content))
        for c in calls:
            toks.extend(self.tokenizer.encode(render_tool_call(c, self.tool_prompt_format)))
        stop = message.get("stop_reason")
        if stop not in (None, "end_of_turn", "end_of_message", "eot", "eom"):
            raise ValueError(f"{where}: stop_reason {stop!r}; expected 'end_of_turn' or 'end_of_message'")
        eom = role == "assistant" and (stop in ("end_of_message", "eom") or (stop is None and bool(calls)))
        toks.append(self._sp["<|eom_id|>" if eom else "<|eot_id|>"])
        return toks

    def encode_dialog_prompt(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """``<|begin_of_text|>`` + every message + (the assistant header that prompts a reply). Exactly one BOS.

        Raises ValueError naming ``messages[i]`` and the bad field.
        """
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
            raise ValueError("encode_dialog_prompt: messages must be a list of message dicts")
        toks = [self._sp["<|begin_of_text|>"]]
        for i, m in enumerate(messages):
            toks.extend(self.encode_message(m, f"messages[{i}]"))
        if add_generation_prompt:
            toks.extend(self.encode_header("assistant"))
        return toks

    def encode_dialog_for_training(
        self, messages: Sequence[Mapping], trained_roles: Sequence[str] = ("assistant",)
    ) -> tuple[list[int], list[float]]:
        """Tokens and loss weights for chat SFT: ``encode_dialog_prompt(messages, add_generation_prompt=False)``
        and a weight 1.0 on each token of a trained role's message after its header (content, tool calls, and the
        eot/eom that teaches the model to stop), 0.0 elsewhere. Returns (ids, weights), equal lengths.
        Raises ValueError like :meth:`encode_dialog_prompt`.
        """
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
            raise ValueError("encode_dialog_for_training: messages must be a list of message dicts")
        ids, weights = [self._sp["<|begin_of_text|>"]], [0.0]
        for i, m in enumerate(messages):
            toks = self.encode_message(m, f"messages[{i}]")
            n_header = len(self.encode_header(m["role"]))
            w = 1.0 if m["role"] in trained_roles else 0.0
            ids.extend(toks)
            weights.extend([0.0] * n_header + [w] * (len(toks) - n_header))
        return ids, weights

    def parse_output(self, text: str) -> Message:
        """See :func:`parse_output`."""
        return parse_output(text)

    def parse_tokens(self, ids: Sequence[int]) -> Message:
        """Decode generated ids (special tokens kept) and parse them. ValueError for ids outside the vocabulary."""
        return parse_output(self.tokenizer.decode(ids))


# ----------------------------------------------------------------------------------------------------------------
# Jinja chat templates (GGUF / Hugging Face)
# ----------------------------------------------------------------------------------------------------------------

# Private-use code points that stand in for special-token text inside message content while the template renders.
_PH_OPEN, _PH_CLOSE = "\U000ffff0", "\U000ffff1"


class TemplateChatFormat:
    """A tokenizer's Jinja ``chat_template`` rendered in a sandbox (jinja2 ``ImmutableSandboxedEnvironment``,
    ``trim_blocks``/``lstrip_blocks``, ``tojson``/``raise_exception``/``strftime_now`` as transformers provides).

    Special tokens written by the template become their ids; special-token text inside message content stays plain
    text (it is swapped for private-use placeholders while rendering). Token ids equal
    ``transformers``' ``apply_chat_template(..., tokenize=True)`` when no content holds special-token text. No BOS is
    added beyond what the template writes, and a doubled leading BOS is collapsed.

    Raises ValueError when the tokenizer has no chat template.
    """

    def __init__(self, tokenizer, template: str | None = None):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.template_source = template if template is not None else tokenizer.chat_template
        if not self.template_source:
            raise ValueError(f"{tokenizer!r} has no chat_template; pass template= or use a Llama 3 tokenizer")

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.template_source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template of {tokenizer.source!r}: Jinja syntax error line {e.lineno}: {e}") from e
        st = tokenizer.special_tokens
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(st, key=len, reverse=True))) if st else None
        self.stop_ids = frozenset(tokenizer.stop_ids)

    def _token_text(self, i):
        return None if i is None else self.tokenizer.decode([i])

    def _hide_specials(self, text: str, table: list[str]) -> str:
        if _PH_OPEN in text or _PH_CLOSE in text:
            raise ValueError("message content holds reserved private-use characters U+FFFF0/U+FFFF1")
        if self._special_re is None:
            return text

        def sub(m):
            table.append(m.group())
            return f"{_PH_OPEN}{len(table) - 1}{_PH_CLOSE}"

        return self._special_re.sub(sub, text)

    def render(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True, tools=None, **template_kwargs
    ) -> str:
        """The template's text for ``messages`` (content left as given). Raises ValueError for a bad message or a
        template error."""
        text, table = self._render(messages, add_generation_prompt, tools, template_kwargs, hide=False)
        return text

    def _render(self, messages, add_generation_prompt, tools, template_kwargs, hide: bool):
        import jinja2

        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
            raise ValueError("encode_dialog_prompt: messages must be a list of message dicts")
        table: list[str] = []
        msgs = []
        for i, m in enumerate(messages):
            role, content, calls = _check_message(m, f"messages[{i}]")
            out = {
                "role": "tool" if role == "ipython" else role,
                "content": self._hide_specials(content, table) if hide else content,
            }
            if calls:
                out["tool_calls"] = [{"type": "function", "function": c.to_dict()} for c in calls]
            msgs.append(out)
        kwargs = dict(template_kwargs)
        if tools:
            custom, builtin = _split_tools(tools)
            kwargs["tools"] = custom or None
            if builtin:
                kwargs["builtin_tools"] = builtin
        try:
            text = self._template.render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.tokenizer.bos_id) or "",
                eos_token=self._token_text(self.tokenizer.eos_id) or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template of {self.tokenizer.source!r} failed: {e}") from e
        return text, table

    def encode_dialog_prompt(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True, tools=None, **template_kwargs
    ) -> list[int]:
        """Render and encode ``messages``; returns list[int]. Raises ValueError like :meth:`render`."""
        text, table = self._render(messages, add_generation_prompt, tools, template_kwargs, hide=True)
        ph = re.compile(re.escape(_PH_OPEN) + r"(\d+)" + re.escape(_PH_CLOSE))
        tok = self.tokenizer
        ids: list[int] = []
        pos = 0
        matches = list(self._special_re.finditer(text)) if self._special_re is not None else []
        for m in matches + [None]:
            end = m.start() if m is not None else len(text)
            if end > pos:
                ids.extend(tok.encode(ph.sub(lambda p: table[int(p.group(1))], text[pos:end])))
            if m is not None:
                ids.append(tok.special_tokens[m.group()])
                pos = m.end()
        bos = tok.bos_id
        while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids.pop(0)
        return ids

    def parse_output(self, text: str) -> Message:
        """See :func:`parse_output`."""
        return parse_output(text)

    def parse_tokens(self, ids: Sequence[int]) -> Message:
        return parse_output(self.tokenizer.decode(ids))


def chat_format_for(tokenizer, **kwargs):
    """:class:`ChatFormat` for a Llama 3 vocabulary (kind "llama3", or any vocabulary holding the Llama 3 header,
    eot/eom and python_tag tokens), else :class:`TemplateChatFormat` on the tokenizer's chat template.

    Raises ValueError when neither applies (no Llama 3 tokens and no chat template).
    """
    st = tokenizer.special_tokens
    llama3 = all(
        t in st
        for t in (
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        )
    )
    if tokenizer.kind == "llama3" or llama3:
        return ChatFormat(tokenizer, **kwargs)
    return TemplateChatFormat(tokenizer, **kwargs)
