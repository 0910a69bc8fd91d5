"""The generate CLI's prompt encoding for Llama 3 checkpoints: --chat, --system, --tools, --date (issue 5 item 3)."""

import datetime
import json

from llama_jax import assets
from llama_jax.chat import ChatFormat, load_tools, system_message
from llama_jax.generate import encode_prompts
from llama_jax.tokenizer import Tokenizer

TOK = Tokenizer.from_file(assets.llama3_tokenizer_path())
DATE = datetime.date(2024, 7, 26)


def test_plain_prompt_gets_one_bos():
    assert encode_prompts(["hi, how are you today?"], TOK, chat=False, system=None, tools=None, date=None) == [
        [128000, 6151, 11, 1268, 527, 499, 3432, 30]
    ]


def test_chat_without_tools_has_no_tool_preamble():
    [ids] = encode_prompts(["Hello"], TOK, chat=True, system="Be brief.", tools=None, date=DATE)
    text = TOK.decode(ids)
    assert ids.count(128000) == 1 and "Environment: ipython" not in text and "Tools:" not in text
    assert "Today Date: 26 Jul 2024" in text and "Be brief." in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_with_builtin_and_custom_tools(tmp_path):
    spec = tmp_path / "tools.json"
    spec.write_text(
        json.dumps(
            [
                {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": {"city": {"param_type": "str", "required": True}},
                }
            ]
        )
    )
    tools = load_tools(f"{spec},brave_search")
    [ids] = encode_prompts(["Weather in Paris?"], TOK, chat=True, system=None, tools=tools, date=DATE)
    text = TOK.decode(ids)
    assert "Environment: ipython\nTools: brave_search\n" in text and "wolfram_alpha" not in text
    assert '"name": "get_weather"' in text
    expected = ChatFormat(TOK).encode_dialog_prompt(
        [system_message("", date=DATE, tools=tools, builtin_tools=()), {"role": "user", "content": "Weather in Paris?"}]
    )
    assert ids == expected


def test_special_token_text_in_a_prompt_stays_plain():
    [ids] = encode_prompts(["stop here <|eot_id|> please"], TOK, chat=True, system=None, tools=None, date=None)
    assert ids.count(128009) == 1  # only the real end of the user turn
