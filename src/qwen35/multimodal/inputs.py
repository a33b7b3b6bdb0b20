"""A prompt with images / videos -> what the engine schedules: expanded token ids, the vision
items (pixels, grid, content hash, where their tokens sit) and the 3-D rotary positions.

Placeholders: each image is one `<|image_pad|>` in the prompt (as the chat template writes it),
expanded to its token count (a run already of that length is kept); each video is one
`<|video_pad|>`, replaced per temporal step by `<{t:.1f} seconds><|vision_start|>` + pads +
`<|vision_end|>`, exactly as transformers' Qwen3VLProcessor writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qwen35.config import VisionConfig
from qwen35.multimodal.media import MediaOptions, load_image, load_video
from qwen35.multimodal.positions import mrope_positions
from qwen35.multimodal.processing import ProcessedMedia, preprocess_image, preprocess_video
from qwen35.multimodal.sizing import MediaError, VisionPreprocessConfig

KINDS = ("image", "video")


@dataclass
class MMItem:
    """One image or video of a request, and where its tokens sit in the prompt."""

    kind: str
    pixels: np.ndarray  # [t*h*w, C*tp*p*p] float32
    grid: tuple[int, int, int]
    content_hash: bytes
    segments: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) per frame

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def start(self) -> int:
        return self.segments[0][0]

    @property
    def end(self) -> int:
        off, n = self.segments[-1]
        return off + n


@dataclass
class MMPrompt:
    token_ids: list[int]
    items: list[MMItem]
    mrope: np.ndarray  # [3, len(token_ids)] int64
    rope_delta: int


def _as_list(kind: str, value) -> list:
    if value is None:
        return []
    if kind == "video":  # one video may itself be a list of frames
        one = (str, dict, ProcessedMedia)
        if isinstance(value, (list, tuple)) and value and not isinstance(value[0], one):
            first = value[0]
            is_frame = isinstance(first, np.ndarray) and first.ndim == 3 or hasattr(first, "mode")
            return [value] if is_frame else list(value)
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


class MultimodalProcessor:
    def __init__(
        self,
        vision: VisionConfig,
        preprocess: VisionPreprocessConfig,
        encode_text,  # str -> token ids (timestamps of video frames)
        limits: dict[str, int],
        media: MediaOptions,
    ):
        self.vision, self.pre, self.encode_text = vision, preprocess, encode_text
        self.limits, self.media = limits, media
        self.merge = vision.spatial_merge_size

    def process(self, ids: list[int], mm_data: dict) -> MMPrompt:
        """Load, preprocess and place the media of one prompt (token ids with placeholders)."""
        processed = self.preprocess(mm_data)
        return self.expand(ids, processed.get("image", []), processed.get("video", []))

    def preprocess(self, mm_data: dict, media: MediaOptions | None = None) -> dict[str, list]:
        """{"image": ..., "video": ...} -> ProcessedMedia lists (items already processed pass
        through). Heavy (decode, resize): the server runs it off the engine thread."""
        media = media or self.media
        if not isinstance(mm_data, dict) or set(mm_data) - set(KINDS):
            raise MediaError(f"multi_modal_data must be a dict with keys among {KINDS}")
        out: dict[str, list] = {}
        for kind in KINDS:
            values = _as_list(kind, mm_data.get(kind))
            limit = self.limits.get(kind, 0)
            if len(values) > limit:
                raise MediaError(
                    f"{len(values)} {kind}(s) in one prompt, but this server takes at most "
                    f"{limit} (limit_mm_per_prompt)"
                )
            out[kind] = [self._one(kind, v, media) for v in values]
        return out

    def with_image_pixels(self, min_pixels: int | None, max_pixels: int | None):
        """This processor with a request's own image size bounds (vLLM's mm_processor_kwargs
        min_pixels / max_pixels), within [the resize factor's square, this one's max_pixels]:
        a request may ask for fewer image tokens, never for more than the server's bound."""
        import copy
        import dataclasses

        pre, lo_limit = self.pre, self.pre.factor * self.pre.factor
        hi = pre.max_pixels if max_pixels is None else max_pixels
        lo = min(pre.min_pixels, hi) if min_pixels is None else min_pixels  # (a low max: the min too)
        for name, v in (("min_pixels", lo), ("max_pixels", hi)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo_limit <= v <= pre.max_pixels:
                raise MediaError(f"mm_processor_kwargs.{name} must be an integer in [{lo_limit}, "
                                 f"{pre.max_pixels}] (this server's max_pixels), got {v!r}")  # fmt: skip
        if lo > hi:
            raise MediaError(f"mm_processor_kwargs: min_pixels {lo} is above max_pixels {hi}")
        out = copy.copy(self)
        out.pre = dataclasses.replace(pre, min_pixels=lo, max_pixels=hi)
        return out

    def _one(self, kind: str, value, media: MediaOptions) -> ProcessedMedia:
        if isinstance(value, ProcessedMedia):
            if value.kind != kind:
                raise MediaError(f"a processed {value.kind} was given as a {kind}")
            return value
        if kind == "image":
            return preprocess_image(load_image(value, media), self.pre)
        frames, fps = load_video(value, media)
        return preprocess_video(frames, self.pre, fps)

    def expand(self, ids: list[int], images: list, videos: list) -> MMPrompt:
        vc, m2 = self.vision, self.merge * self.merge
        pads = {vc.image_token_id: ("image", images), vc.video_token_id: ("video", videos)}
        runs = {"image": 0, "video": 0}
        out: list[int] = []
        items: list[MMItem] = []
        segments: list[tuple[int, int, int]] = []
        i = 0
        while i < len(ids):
            tok = ids[i]
            if tok not in pads:
                out.append(tok)
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == tok:
                j += 1
            kind, media = pads[tok]
            k = runs[kind]
            runs[kind] += 1
            if k >= len(media):
                i = j
                continue  # counted below: more placeholders than media
            pm = media[k]
            t, gh, gw = pm.grid
            mh, mw = gh // self.merge, gw // self.merge
            item = MMItem(kind, pm.pixel_values, pm.grid, pm.content_hash)
            if kind == "image":
                n = t * gh * gw // m2
                if j - i not in (1, n):
                    raise MediaError(
                        f"image {k + 1} needs {n} placeholder tokens, the prompt has {j - i}"
                    )
                item.segments.append((len(out), n))
                segments.append((len(out), mh, mw))
                out.extend([tok] * n)
            else:
                if j - i != 1:
                    raise MediaError("each video needs exactly one <|video_pad|> placeholder")
                for step in range(t):
                    out.extend(self.encode_text(f"<{pm.timestamps[step]:.1f} seconds>"))
                    out.append(vc.vision_start_token_id)
                    item.segments.append((len(out), mh * mw))
                    segments.append((len(out), mh, mw))
                    out.extend([tok] * (mh * mw))
                    out.append(vc.vision_end_token_id)
            items.append(item)
            i = j
        for kind, media in (("image", images), ("video", videos)):
            if runs[kind] != len(media):
                raise MediaError(
                    f"the prompt has {runs[kind]} {kind} placeholder(s) but {len(media)} "
                    f"{kind}(s) were given"
                )
        pos, delta = mrope_positions(len(out), segments)
        return MMPrompt(out, items, pos, delta)
