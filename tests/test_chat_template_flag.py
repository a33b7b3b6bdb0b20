"""`--chat-template` (vLLM's flag): a template file or the template text replaces the
checkpoint's for every chat prompt (LLM.chat, the server, /tokenizer_info); a missing file, an
empty or broken template is refused, naming the flag, before any weights load."""

from __future__ import annotations

import pytest

from qwen35.chat_format import ChatFormatError, read_template_arg
from qwen35.request import SamplingParams
from test_engine import make
from tiny import VOCAB_REAL, save_checkpoint

TEMPLATE = (
    "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)


def test_read_template_arg(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert read_template_arg(str(f)) == TEMPLATE
    assert read_template_arg(TEMPLATE) == TEMPLATE  # the text itself
    with pytest.raises(ChatFormatError, match="no such file"):
        read_template_arg(str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ChatFormatError, match="empty"):
        read_template_arg(str(tmp_path / "empty.jinja"))
    with pytest.raises(ChatFormatError, match="does not compile"):
        read_template_arg("{% for m in messages %}")
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe{{")
    with pytest.raises(ChatFormatError, match="cannot read"):
        read_template_arg(str(tmp_path / "bin.jinja"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat-template") / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32)  # the real vocabulary: chat text
    return d


def test_engine_renders_with_the_given_template(ckpt, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    llm = make(ckpt, chat_template=str(f))
    assert llm.engine.chat_template.source == TEMPLATE
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=1))
    want = "<<user>>hello\n<<assistant>>"
    assert out.prompt_token_ids == llm.tokenizer.encode(want)
    # LLM.chat's continue_final_message (vLLM's): the prompt ends inside the final message
    msgs += [{"role": "assistant", "content": "Sure: "}]
    out = llm.chat(msgs, SamplingParams(max_tokens=1), add_generation_prompt=False,
                   continue_final_message=True)  # fmt: skip
    # (this template keeps the trailing space; Qwen's trims it)
    assert llm.tokenizer.decode(out.prompt_token_ids).endswith("<<assistant>>Sure: ")
    default = make(ckpt)
    assert default.engine.chat_template.source != TEMPLATE


def test_a_bad_template_is_refused_before_the_weights_load(ckpt, tmp_path, monkeypatch):
    from qwen35.engine import llm_engine

    loads = []
    monkeypatch.setattr(llm_engine, "load_model", lambda *a, **k: loads.append(1) / 0)
    with pytest.raises(ChatFormatError, match="--chat-template .*no such file"):
        make(ckpt, chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(ChatFormatError, match="does not compile"):
        make(ckpt, chat_template="{{ broken")
    assert loads == []
