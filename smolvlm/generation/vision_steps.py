"""Chunked prefill's vision work: the frames prefilling requests wait for, encoded a few frame-layers per step.

One 512px tile through the vision tower (SmolVLM2-256M: 12 SigLIP layers over 1024 patches) takes ~0.6 s on 2 CPU
cores, so as one step's work it alone would be the running streams' longest wait between two tokens. While requests
decode, a step runs at most the scheduler's `vision_layers` frame-layers (4: one layer of 4 frames, or 4 layers of
one): the pass in progress carries its hidden state (`VisionPass`: [n, 1024, 768] for n tiles, 1.5 MB each in bf16)
to the next step, and frames whose layers have all run go through the connector into the feature cache and to every
prefilling request that shows them. The pass is `Model.get_image_features`' math in the same order, so the features
are its bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..model.vision import VisionPass
from .feature_cache import LRU, ZERO_FRAME, ready, stacked_frames
from .scheduler import Request


@dataclass
class FramePass:
    """The vision pass of a few frames, and for each the (request, frame index) pairs waiting for its features."""

    keys: list  # each frame's content key (caches off: (id(request), frame), shared with no one)
    users: list[list[tuple[Request, int]]]
    state: VisionPass


class SlicedVision:
    """Encodes the frames of prefilling requests in slices of encoder layers, up to `frames` frames per pass (one
    layer of 4 SmolVLM2-256M tiles on 2 AMX cores: 69 ms, against 95 for 4 layers of one), in prompt order."""

    def __init__(self, model, cache: LRU | None, frames: int):
        self.model, self.cache, self.frames = model, cache, frames
        self.current: FramePass | None = None

    def run(self, prefilling: list[Request], layers: int | None) -> int:
        """Run at most `layers` frame-layers (encoder layers times the frames of the pass; a pass wider than that
        still runs one layer) for the next frames `prefilling` (in order) wait for, continuing the pass in progress;
        layers=None only finishes that pass (the caller encodes whole frames). Returns the frame-layers run."""
        done = 0
        n_layers = self.model.model.vision_model.n_layers
        if self.current is not None and all(r.finish_reason is not None for users in self.current.users
                                            for r, _ in users):
            self.current = None  # every request waiting for it left (caches off, or the features are in the cache)
        while layers is None or done < layers:
            if self.current is None:
                if layers is None:
                    break
                self.current = self._begin(prefilling)
                if self.current is None:
                    break
            state, width = self.current.state, len(self.current.keys)
            n = n_layers - state.done
            if layers is not None:
                n = min(n, (layers - done) // width)
                if n == 0 and done:
                    break
                n = max(n, 1)
            self.model.run_vision(state, n)
            done += n * width
            if state.done == n_layers:
                self._end(self.current)
                self.current = None
        return done

    def _begin(self, prefilling: list[Request]) -> FramePass | None:
        """The pass of the first `frames` distinct frames that prefilling requests still wait for (None: none)."""
        keys, users, shown = [], [], []
        for r in prefilling:
            for f in r.shows(r.length, len(r.prompt)):
                if len(keys) == self.frames:
                    break
                if ready(r, f, self.cache):
                    continue
                if r.frames is None:
                    key, waiting = (id(r), f), [(r, f)]
                elif r.frames[f] in keys:
                    continue
                else:  # every row showing the same picture gets it
                    key = r.frames[f]
                    waiting = [(q, g) for q in prefilling if q.frames is not None
                               for g, k in enumerate(q.frames) if k == key and q.features[g] is None]
                keys.append(key), users.append(waiting), shown.append((r, f))
        if not keys:
            return None
        frames, patch_mask = self.model.image_frames(*stacked_frames(self.model, shown))
        if frames.shape[0] != len(keys):
            raise InputError(ZERO_FRAME)
        return FramePass(keys, users, self.model.begin_vision(frames, patch_mask))

    def _end(self, done: FramePass) -> None:
        features = self.model.end_vision(done.state)  # [n, N, D]
        for key, users, frame in zip(done.keys, done.users, features.unbind(0)):
            if isinstance(key, bytes):
                self.cache.put(key, frame.clone())  # its own storage: evicted alone
            for r, f in users:
                if r.finish_reason is None:
                    r.features[f] = frame
