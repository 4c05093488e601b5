"""Chunked prefill's vision work: the frames prefilling requests wait for, encoded a few encoder layers per step.

One 512px tile through the vision tower (SmolVLM2-256M: 12 SigLIP layers over 1024 patches) takes ~0.6 s on 2 CPU
cores, so as one step's work it alone would be the running streams' longest wait between two tokens. While requests
decode, a step runs at most the scheduler's `vision_layers` encoder layers (of one frame): the pass in progress
carries its hidden state (`VisionPass`: [1, 1024, 768] for that tile, 1.5 MB in bf16) to the next step, and a frame
whose layers have all run goes through the connector into the feature cache and to every prefilling request that
shows it. The pass is `Model.get_image_features`' math in the same order, so the features are its bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..model.vision import VisionPass
from .feature_cache import LRU, ZERO_FRAME, ready
from .scheduler import Request


@dataclass
class FramePass:
    """The vision pass of one frame, and the (request, frame index) pairs waiting for its features."""

    key: object  # the frame's content key (caches off: (id(request), frame), shared with no one)
    users: list[tuple[Request, int]]
    state: VisionPass


class SlicedVision:
    """Encodes the frames of prefilling requests in slices of encoder layers, one frame at a time, in prompt order."""

    def __init__(self, model, cache: LRU | None):
        self.model, self.cache = model, cache
        self.current: FramePass | None = None

    def run(self, prefilling: list[Request], layers: int | None) -> int:
        """Run at most `layers` encoder layers for the next frames `prefilling` (in order) wait for, continuing the
        pass in progress; layers=None only finishes that pass (the caller encodes whole frames). Returns the layers
        run."""
        done = 0
        n_layers = self.model.model.vision_model.n_layers
        if self.current is not None and all(r.finish_reason is not None for r, _ in self.current.users):
            self.current = None  # every request waiting for it left (caches off, or the features are in the cache)
        while layers is None or done < layers:
            if self.current is None:
                if layers is None:
                    break
                self.current = self._begin(prefilling)
                if self.current is None:
                    break
            state = self.current.state
            n = n_layers - state.done if layers is None else min(layers - done, n_layers - state.done)
            self.model.run_vision(state, n)
            done += n
            if state.done == n_layers:
                self._end(self.current)
                self.current = None
        return done

    def _begin(self, prefilling: list[Request]) -> FramePass | None:
        """The pass of the first frame that a prefilling request still waits for (None: none does)."""
        for r in prefilling:
            for f in r.shows(r.length, len(r.prompt)):
                if ready(r, f, self.cache):
                    continue
                if r.frames is None:
                    key, users = (id(r), f), [(r, f)]
                else:  # every row showing the same picture gets it
                    key = r.frames[f]
                    users = [(q, g) for q in prefilling if q.frames is not None
                             for g, k in enumerate(q.frames) if k == key and q.features[g] is None]
                pixels = r.prompt.pixel_values[f][None, None].to(self.model.device)  # [1, 1, 3, S, S]
                masks = r.prompt.pixel_attention_mask[f][None, None].to(self.model.device)
                frames, patch_mask = self.model.image_frames(pixels, masks)
                if frames.shape[0] != 1:
                    raise InputError(ZERO_FRAME)
                return FramePass(key, users, self.model.begin_vision(frames, patch_mask))
        return None

    def _end(self, done: FramePass) -> None:
        features = self.model.end_vision(done.state)[0]  # [N, D]
        if isinstance(done.key, bytes):
            self.cache.put(done.key, features)
        for r, f in done.users:
            if r.finish_reason is None:
                r.features[f] = features
