"""Chat prompts: our sandboxed rendering + tokenization against transformers' apply_chat_template."""

import json
import shutil
from pathlib import Path

import pytest
import transformers

from artifact.contract import read_manifest
from qwen2_export.export import export_checkpoint
from runtime import Model, RuntimeInputError
from runtime.chat import ChatTemplate

TEMPLATES = Path(__file__).parent / "data"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello, world! 你好"}],
    "system_and_turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "Now in French — s'il vous plaît."},
    ],
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
    ]},
    {"role": "tool", "name": "get_weather", "content": json.dumps({"temperature": 21})},
    {"role": "tool", "name": "get_weather", "content": json.dumps({"temperature": 17})},
    {"role": "assistant", "content": "Paris 21 °C, Zürich 17 °C."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def chat_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact, once per published template (the checkpoint's template replaced)."""
    folders = {}
    for name in ("qwen2_instruct", "qwen25_instruct"):
        folder = tmp_path_factory.mktemp("chat") / name
        shutil.copytree(tiny_artifact("dense_tied"), folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = (TEMPLATES / f"{name}_chat_template.jinja").read_text()
        config_path.write_text(json.dumps(config))
        folders[name] = folder
    return folders


def reference_ids(folder, messages, tools=None):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@pytest.mark.parametrize("template", ["qwen2_instruct", "qwen25_instruct"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_chat_ids_equal_apply_chat_template(chat_artifact, template, conversation):
    model = Model.load(chat_artifact[template])
    messages = CONVERSATIONS[conversation]
    assert model.encode(messages) == reference_ids(chat_artifact[template], messages)


def test_qwen25_tools_and_tool_calls_equal_apply_chat_template(chat_artifact):
    folder = chat_artifact["qwen25_instruct"]
    model = Model.load(folder)
    ours = model.encode(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert ours == reference_ids(folder, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    text = model.tokenizer.decode(ours, skip_special_tokens=False)
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text  # tojson keeps non-ASCII
    assert "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response>\n<tool_response>" in text


def test_template_is_sandboxed():
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ChatTemplate(hostile).render([{"role": "user", "content": "x"}])


def test_raise_exception_in_template_becomes_input_error():
    template = ChatTemplate("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(RuntimeInputError, match="only user turns"):
        template.render([{"role": "system", "content": "x"}])


def test_missing_template_names_the_flag(tiny_artifact, tmp_path):
    folder = shutil.copytree(tiny_artifact("dense_tied"), tmp_path / "no-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeInputError, match="--chat-template FILE"):
        Model.load(folder).encode([{"role": "user", "content": "Hi"}])
    with_file = Model.load(folder, chat_template=TEMPLATES / "qwen2_instruct_chat_template.jinja")
    generation_prompt = with_file.tokenizer.encode("<|im_start|>assistant\n")
    assert with_file.encode([{"role": "user", "content": "Hi"}])[-len(generation_prompt):] == generation_prompt


def test_a_template_kept_in_chat_template_jinja_is_carried_and_declared(tiny_checkpoint, tmp_path):
    """Newer checkpoints keep the template in chat_template.jinja, not tokenizer_config.json: the artifact
    carries the file, the manifest says it has a template, and the runtime chats with it."""
    checkpoint = shutil.copytree(tiny_checkpoint("dense_tied"), tmp_path / "checkpoint")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copyfile(TEMPLATES / "qwen25_instruct_chat_template.jinja", checkpoint / "chat_template.jinja")
    artifact = export_checkpoint(checkpoint, tmp_path / "artifact")
    assert read_manifest(artifact).tokenizer.has_chat_template and (artifact / "chat_template.jinja").is_file()
    messages = CONVERSATIONS[sorted(CONVERSATIONS)[0]]
    assert Model.load(artifact).encode(messages) == reference_ids(artifact, messages)
