"""Chat with images through the OpenAI client on the real engine (tiny random VLM, real
Qwen 3.5 tokenizer): base64 image parts streaming and not, usage counting image tokens, and
the 400s for bad media."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from qwen35.multimodal.sizing import image_grid, num_tokens
from server_fakes import serving_tiny_engine


def data_url(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> str:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_msg(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("tiny-vlm-server"), max_num_seqs=4)


def test_chat_with_base64_image(server):
    srv, client, engine = server
    assert engine.has_vision
    msgs = image_msg(data_url(64, 48))
    extra = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                       temperature=0, extra_body=extra)  # fmt: skip
    text_only = engine.chat_template.render(msgs, enable_thinking=False)
    n_img = num_tokens(image_grid(64, 48))
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(text_only)) - 1 + n_img
    assert r.usage.completion_tokens == 4
    streamed, usage = "", None
    for ch in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    ):  # fmt: skip
        streamed += "".join(c.delta.content or "" for c in ch.choices)
        usage = ch.usage or usage
    assert streamed == r.choices[0].message.content and usage.prompt_tokens == r.usage.prompt_tokens
    # a different image: same prompt length, prefix cache cannot serve the image's blocks
    before = engine.get_stats()["prefix_cache_hit_tokens"]
    client.chat.completions.create(model="tiny", messages=image_msg(data_url(64, 48, seed=1)),
                                   max_tokens=1, extra_body=extra)  # fmt: skip
    assert engine.get_stats()["prefix_cache_hit_tokens"] - before < 16


@pytest.mark.parametrize(
    "part, needle",
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
         "not an image"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, "not allowed"),
        ({"type": "image_url", "image_url": {"url": "/etc/hostname"}}, "not a path"),
        ({"type": "image_url", "image_url": {}}, "url"),
        ({"type": "video_url", "video_url": {"url": data_url(32, 32)}}, "not an animation"),
    ],
    ids=["not-image", "bad-base64", "url-not-allowed", "server-file", "no-url", "still-video"],
)  # fmt: skip
def test_bad_media_is_400(server, part, needle):
    srv, _, _ = server
    body = {"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}  # fmt: skip
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_mm_processor_kwargs_bound_the_image_tokens(server):
    """vLLM's mm_processor_kwargs min_pixels / max_pixels per request: a smaller max_pixels
    gives the image fewer tokens (the same resize formula the planner uses); values beyond the
    server's bound, unknown keys and min > max are 400s naming the field."""
    import dataclasses

    from qwen35.multimodal.sizing import VisionPreprocessConfig

    srv, client, engine = server
    msgs = image_msg(data_url(320, 240))
    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1,
                                           extra_body=extra)  # fmt: skip
    small = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, extra_body={
        **extra, "mm_processor_kwargs": {"max_pixels": 128 * 128}})  # fmt: skip
    pre = engine.mm_processor.pre
    tokens = lambda cfg: num_tokens(image_grid(320, 240, cfg))  # noqa: E731
    bounded = dataclasses.replace(pre, min_pixels=min(pre.min_pixels, 128 * 128),
                                  max_pixels=128 * 128)  # (a max below the min lowers it too)
    assert tokens(bounded) < tokens(pre)
    assert whole.usage.prompt_tokens - small.usage.prompt_tokens == tokens(pre) - tokens(bounded)
    assert isinstance(pre, VisionPreprocessConfig)
    for kw, says in (({"max_pixels": pre.max_pixels + 1}, "max_pixels must be"),
                     ({"min_pixels": 5000, "max_pixels": 4096}, "above max_pixels"),
                     ({"fps": 2}, "fps not supported")):  # fmt: skip
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": msgs, "max_tokens": 1, "mm_processor_kwargs": kw})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "mm_processor_kwargs"


def test_animated_gif_as_video(server):
    srv, client, engine = server
    frames = [Image.fromarray(np.full((40, 56, 3), 40 * i, np.uint8)) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=250)
    url = "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "Describe."}]}]  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 2
    assert r.usage.prompt_tokens > len(engine.tokenizer.encode("Describe.")) + 16


@pytest.mark.slow  # a second engine; the chat path itself is covered by the server tests
def test_llm_chat_with_image_parts(server, tmp_path):
    from qwen35 import LLM, SamplingParams

    _, _, engine = server
    llm = LLM(str(engine.model.model_dir), max_model_len=512, max_memory="256MiB", verbose=False)
    img = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "p.png")
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    parts = [
        {"type": "image", "image": Image.fromarray(img)},
        {"type": "image_url", "image_url": {"url": str(tmp_path / "p.png")}},
        {"type": "text", "text": "Same?"},
    ]
    out = llm.chat([{"role": "user", "content": parts}], sp, enable_thinking=False)
    ids = out.prompt_token_ids
    vc = engine.config.vision
    assert ids.count(vc.image_token_id) == 2 * num_tokens(image_grid(64, 48))
    assert ids.count(vc.vision_start_token_id) == 2 and len(out.outputs[0].token_ids) == 3
