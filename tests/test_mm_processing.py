"""Preprocessing equal to transformers' Qwen 3.5 processors, media loading, chat media parts,
and `qwen35 plan --image` (the same sizing formula)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen35.chat_format import ChatTemplate
from qwen35.multimodal.chat import extract_media
from qwen35.multimodal.media import MediaOptions, load_image, load_video
from qwen35.multimodal.processing import (
    load_preprocess_config,
    preprocess_image,
    preprocess_video,
    video_timestamps,
)
from qwen35.multimodal.sizing import (
    MediaError,
    VisionPreprocessConfig,
    image_grid,
    num_tokens,
    video_grid,
)

DEFAULT = VisionPreprocessConfig()
SMALL = VisionPreprocessConfig(max_pixels=1 << 20)  # keeps the huge inputs' outputs small


def hf_image_processor(cfg: VisionPreprocessConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, merge_size=cfg.merge_size,
        temporal_patch_size=cfg.temporal_patch_size, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
    )  # fmt: skip


def _hf_version() -> tuple[int, int]:
    import transformers

    return tuple(int(p) for p in transformers.__version__.split(".")[:2])


SIZES = [  # (width, height, config, mode)
    (1, 1, DEFAULT, "RGB"), (7, 300, DEFAULT, "RGB"), (32, 32, DEFAULT, "L"),
    (100, 37, DEFAULT, "RGBA"), (256, 256, DEFAULT, "RGB"), (640, 480, DEFAULT, "P"),
    (333, 777, DEFAULT, "RGB"), (1920, 1080, DEFAULT, "RGB"), (2000, 33, DEFAULT, "RGB"),
    (6000, 4000, SMALL, "RGB"), (4096, 5000, SMALL, "RGB"), (513, 1025, SMALL, "LA"),
]  # fmt: skip


@pytest.mark.parametrize("w, h, cfg, mode", SIZES, ids=[f"{w}x{h}-{m}" for w, h, _, m in SIZES])
def test_image_preprocessing_equals_transformers(w, h, cfg, mode):
    if "A" in mode and _hf_version() < (5, 21):
        pytest.skip("transformers < 5.21 drops an image's alpha channel; 5.21+ composites it onto "
                    "white, as qwen-vl-utils and this project do")  # fmt: skip
    rng = np.random.default_rng(w * 7 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA" or mode == "LA":
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    img = img.convert(mode)
    ref = hf_image_processor(cfg)(images=[img], return_tensors="np")
    ours = preprocess_image(img, cfg)
    assert list(ours.grid) == ref["image_grid_thw"][0].tolist() == list(image_grid(w, h, cfg))
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    # a uint8 array is the same image
    if mode == "RGB":
        np.testing.assert_array_equal(
            preprocess_image(np.asarray(img), cfg).pixel_values, ours.pixel_values
        )


@pytest.mark.parametrize(
    "frames, w, h", [(2, 64, 48), (3, 640, 360), (8, 1280, 720), (17, 30, 900)]
)
def test_video_grid_and_timestamps_equal_transformers(frames, w, h):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if frames % 2 and _hf_version() < (5, 18):
        pytest.skip("transformers < 5.18 counts an odd frame count's patches without the padding "
                    "frame its processor adds; 5.18+ and this project count it")  # fmt: skip
    proc = Qwen3VLVideoProcessor()
    t, gh, gw = video_grid(frames, w, h)
    assert t * gh * gw == proc.get_num_of_video_patches(frames, h, w)
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    ref = Qwen3VLProcessor._calculate_timestamps(None, list(range(frames)), 24.0, 2)
    assert video_timestamps(frames, 24.0, 2) == pytest.approx(ref)
    if frames <= 3:
        vid = [np.full((h, w, 3), 30 * i, np.uint8) for i in range(frames)]
        pm = preprocess_video(vid, DEFAULT)
        assert pm.grid == (t, gh, gw) and pm.pixel_values.shape == (t * gh * gw, 1536)
        assert pm.num_tokens(2) == num_tokens((t, gh, gw))


def _png_url(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_media_sources(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    opts = MediaOptions()
    assert np.array_equal(np.asarray(load_image(_png_url(a), opts)), a)
    Image.fromarray(a).save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "x.png"), opts)), a)
    with pytest.raises(MediaError, match="not a path"):
        load_image(str(tmp_path / "x.png"), MediaOptions(allow_local_files=False))
    with pytest.raises(MediaError, match="not allowed"):
        load_image("http://evil.example/x.png", MediaOptions(allowed_domains=("good.example",)))
    with pytest.raises(MediaError, match="byte limit"):
        load_image(_png_url(a), MediaOptions(max_bytes=100))
    with pytest.raises(MediaError, match="no media file"):
        load_image(str(tmp_path / "missing.png"), opts)
    with pytest.raises(MediaError, match="File name too long"):  # an OSError before
        load_image(str(tmp_path / ("x" * 300)), opts)
    with pytest.raises(MediaError, match="at least 2 frames"):
        preprocess_video([a], DEFAULT)
    with pytest.raises(MediaError, match="aspect ratio"):
        preprocess_image(np.zeros((1, 300, 3), np.uint8), DEFAULT)
    # an animated GIF is a video, sampled at 2 fps (at least 4 frames)
    frames = [Image.fromarray(np.full((16, 16, 3), 25 * i, np.uint8)) for i in range(10)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    got, fps = load_video(
        "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode(), opts
    )
    assert len(got) == 4 and fps == pytest.approx(4.0)


def test_preprocessor_config_overrides(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1024, "longest_edge": 4096}, "image_mean": [0.1, 0.2, 0.3]}))  # fmt: skip
    cfg = load_preprocess_config(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (1024, 4096, (0.1, 0.2, 0.3))


FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"


def test_chat_media_parts_render_like_the_official_template():
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image", "image": "b.png"},
        {"type": "video_url", "video_url": {"url": "v.gif"}},
        {"type": "text", "text": "Describe these."},
    ]}]  # fmt: skip
    out, media = extract_media(msgs)
    assert media == {"image": ["data:image/png;base64,AAAA", "b.png"], "video": ["v.gif"]}
    builtin = ChatTemplate(None, default_thinking=True).render(out)
    jinja = ChatTemplate(FIXTURE.read_text(), default_thinking=True).render(out)
    want = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|>"
            "<|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Describe "
            "these.<|im_end|>\n<|im_start|>assistant\n<think>\n")  # fmt: skip
    assert builtin == jinja == want
    with pytest.raises(MediaError, match="url"):
        extract_media([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_plan_image_uses_the_engine_formula(capsys):
    from qwen35.cli import main

    assert main(["plan", "-m", "0.8B", "--image", "1920x1080", "--image", "640x480", "--json"]) == 0
    images = json.loads(capsys.readouterr().out)["images"]
    assert [p["tokens"] for p in images] == [2040, num_tokens(image_grid(640, 480))]
    a = np.zeros((480, 640, 3), np.uint8)
    assert preprocess_image(a, DEFAULT).num_tokens(2) == images[1]["tokens"]
    assert images[0]["encoder_working_bytes"]["Qwen3.5-0.8B"] > 0
    assert main(["plan", "-m", "0.8B", "--image", "1024x1024"]) == 0
    assert "1024 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--image", "big"])


def test_http_fetch_only_from_allowed_domains(tmp_path):
    import functools
    import http.server
    import threading

    a = np.random.default_rng(1).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "img.png")
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        ok = MediaOptions(allowed_domains=("127.0.0.1",), allow_local_files=False)
        assert np.array_equal(np.asarray(load_image(url + "/img.png", ok)), a)
        with pytest.raises(MediaError, match="not allowed"):
            load_image(url + "/img.png", MediaOptions())  # fetching is off by default
        with pytest.raises(MediaError, match="byte limit"):
            load_image(
                url + "/big.bin", MediaOptions(allowed_domains=("127.0.0.1",), max_bytes=100)
            )
        with pytest.raises(MediaError, match="could not fetch"):
            load_image(url + "/missing.png", ok)
    finally:
        srv.shutdown()


def test_an_mp4_video_is_refused_with_what_to_send_instead():
    import base64

    from qwen35.multimodal.media import MediaError, MediaOptions, load_video

    mp4 = b"\x00\x00\x00\x18ftypmp42" + bytes(64)  # an mp4 header: no decoder for it here
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    with pytest.raises(MediaError, match="mp4 and other containers need a decoder"):
        load_video(url, MediaOptions())
