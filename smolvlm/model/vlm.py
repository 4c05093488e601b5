"""`Model`: SigLIP vision encoder -> pixel-shuffle connector -> SmolLM2 decoder -> lm_head.

The module tree is the HF one (`model.vision_model`, `model.connector`, `model.text_model`, `lm_head`), so
`state_dict()` is the released checkpoint format and LoRA can target the usual projection names.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import hub
from ..config import SmolVLMConfig
from ..errors import InputError
from ..weights import load_weights, read_tensors, resolve_device, resolve_dtype, return_large_frees_to_os
from . import fast, kernels
from .connector import Connector
from .kv_cache import KVCache
from .text import TextModel, rope_inv_freq
from .vision import VisionPass, VisionTransformer


VISION_CHUNK = {"cpu": 4, "cuda": 16}  # frames per vision-tower pass by device type (see get_image_features)


def vision_chunk(device: torch.device) -> int:
    """Frames per vision-tower pass on `device` (VISION_CHUNK; other device types as the CPU)."""
    return VISION_CHUNK.get(device.type, VISION_CHUNK["cpu"])


class Backbone(nn.Module):
    """The `model.` prefix of the checkpoint keys."""

    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        vision, text = config.vision_config, config.text_config
        self.vision_model = VisionTransformer(vision)
        self.connector = Connector(vision.hidden_size, text.hidden_size, config.scale_factor)
        self.text_model = TextModel(text)


class Model(nn.Module):
    def __init__(self, config: SmolVLMConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight
        self.packed_decoder = None  # fused for the C++ decode step: its weights list, made once (fast.fuse)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        fuse: bool = False,
        quantize: str | None = None,
        defer: frozenset[str] = frozenset(),
    ) -> Model:
        """Load a checkpoint folder or hub repo id. `dtype` defaults to the checkpoint's own (fp32 if it names none);
        `device` to the CPU. Weights go one by one straight to `device` in `dtype`.

        fuse=True returns the model fused for inference (see `fuse`), reading the weights it copies straight into
        their fused layout; quantize="int8" (implies fuse) with int8 text-decoder weights. Keys in `defer` are checked
        but left on the meta device for the caller to fill (QLoRA quantizes them as it reads them)."""
        folder = hub.resolve(path_or_repo_id, revision=revision)
        config = SmolVLMConfig.from_pretrained(folder)
        dtype = resolve_dtype(dtype, config.dtype)
        device = resolve_device(device)
        fast.check_quantize(quantize, device)
        if device.type == "cpu":
            return_large_frees_to_os()  # before the first weight is read: see its docstring
        with torch.device("meta"):
            model = cls(config)
        tied = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
        copied = frozenset(fast.copied_keys(model)) if fuse or quantize else frozenset()
        load_weights(model, folder, dtype, device, skip=tied, defer=copied | defer)
        if config.tie_word_embeddings and not copied:
            model.lm_head.weight = model.model.text_model.embed_tokens.weight
        rotary = model.model.text_model.rotary_emb
        rotary.inv_freq = rope_inv_freq(rotary.theta, rotary.head_dim).to(device)  # computed, not loaded
        model.eval()
        if copied:
            alias = {"lm_head.weight": "model.text_model.embed_tokens.weight"} if tied else {}

            def read(keys):
                tensors = read_tensors(folder, [alias.get(k, k) for k in keys], dtype, device)
                return {k: tensors[alias.get(k, k)] for k in keys}

            fast.fuse(model, quantize, read)
        return model

    def fuse(self, quantize: str | None = None) -> Model:
        """Make this model an inference model, in place; returns it. Fused q/k/v and gate/up projections, weights
        reordered for the device's fastest kernels, and with quantize="int8" int8 text-decoder and lm_head weights
        (smolvlm/model/fast.py). Outputs stay those of the plain model (int8: within its quantization error).
        `unfuse()` gives back the HF layers; training, LoRA and `state_dict()` need the unfused model.
        Fuse after moving the model to its device and dtype."""
        fast.check_quantize(quantize, self.device)
        if quantize and self.fused:
            raise InputError(f"This model is already fused; call model.unfuse() before fuse(quantize={quantize!r})")
        fast.fuse(self, quantize)
        return self

    def unfuse(self) -> Model:
        """Give back the HF module tree (q_proj, k_proj, ...) of a fused model, in place; returns it. Exact for
        `fuse()`; after quantize="int8" the weights are the dequantized int8 ones."""
        fast.unfuse(self)
        return self

    @property
    def fused(self) -> bool:
        return fast.is_fused(self)

    def state_dict(self, *args, **kwargs):
        if self.fused:
            raise InputError("This model is fused for inference (Model.fuse); call model.unfuse() before state_dict()")
        return super().state_dict(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.text_model.embed_tokens.weight.device

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n_real_frames * image_seq_len, D_t] features for `pixel_values` [B, I, 3, H, W].

        All-zero frames are batch padding and are dropped (SmolVLM2 keeps frame 0 when no frame is real, as its
        reference does); `pixel_attention_mask` [B, I, H, W] marks the image pixels of each frame (None: all).
        The frames of all images are encoded as one batch.
        """
        frames, patch_mask = self.image_frames(pixel_values, pixel_attention_mask)
        if frames.shape[0] == 0:  # Idefics3 keeps no frame when all are padding
            return frames.new_zeros(0, self.config.text_config.hidden_size)
        # Inference runs the tower VISION_CHUNK frames at a time: per-frame math, so the same features, and a chunk's
        # matmuls (CPU: 4 x 1024 patches for 512px tiles; GPU: 16 x 1024, enough to fill an H200 and to amortize the
        # launches) are already as fast per frame as any bigger batch, while the activations of a many-tile photo or a
        # 64-frame video stay those of one chunk. (Autograd keeps every chunk's anyway: one pass.)
        chunk = len(frames) if torch.is_grad_enabled() else vision_chunk(frames.device)
        layers = self.model.vision_model.n_layers
        features = torch.cat([
            self.end_vision(self.run_vision(self.begin_vision(f, m), layers))  # [chunk, N, D_t]
            for f, m in zip(frames.split(chunk), patch_mask.split(chunk))
        ])  # fmt: skip
        return features.reshape(-1, features.shape[-1])

    def image_frames(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The real frames [n, 3, H, W] of `pixel_values` [B, I, 3, H, W] in the model's dtype (padding dropped, as
        `get_image_features` says) and their patch masks [n, H/P, W/P] (True = the patch holds image pixels)."""
        if pixel_values.dim() != 5:
            shape = list(pixel_values.shape)
            raise InputError(f"pixel_values must be [batch, images, 3, height, width]; got shape {shape}")
        b, i, c, h, w = pixel_values.shape
        p, s = self.config.vision_config.patch_size, self.config.scale_factor
        if h // p != w // p or (h // p) % s:
            raise InputError(
                f"pixel_values frames are {h}x{w}: they must be square with a patch grid divisible by scale_factor {s} "
                f"(the processor makes {self.config.vision_config.image_size}x{self.config.vision_config.image_size})"
            )
        if pixel_attention_mask is not None and tuple(pixel_attention_mask.shape) != (b, i, h, w):
            raise InputError(
                f"pixel_attention_mask has shape {list(pixel_attention_mask.shape)}; "
                f"expected {[b, i, h, w]} to match pixel_values"
            )
        frames = pixel_values.to(self.dtype).reshape(b * i, c, h, w)
        real = (frames != 0).flatten(1).any(dim=1)  # [B*I]; padding frames are exactly all-zero
        if self.config.model_type == "smolvlm":
            real[0] |= ~real.any()
        frames = frames[real]
        n = frames.shape[0]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones((n, h, w), dtype=torch.bool, device=frames.device)
        else:
            pixel_mask = pixel_attention_mask.reshape(b * i, h, w)[real]
        # A patch is valid when any of its pixels is (a trailing remainder smaller than a patch is dropped).
        hp, wp = h // p, w // p
        return frames, pixel_mask[:, : hp * p, : wp * p].reshape(n, hp, p, wp, p).sum(dim=(2, 4)) > 0

    # One vision pass in slices of encoder layers: begin_vision, run_vision as often as needed, end_vision. The engine
    # spreads a tile's layers over several steps this way; the math is get_image_features', so the features are too.

    def begin_vision(self, frames: torch.Tensor, patch_mask: torch.Tensor) -> VisionPass:
        """The pass over `image_frames`' frames [n, 3, H, W] and patch masks [n, h, w], before its first layer."""
        return self.model.vision_model.begin(frames, patch_mask)

    def run_vision(self, state: VisionPass, layers: int) -> VisionPass:
        """Run the pass's next `layers` encoder layers (those left, if fewer), in place."""
        return self.model.vision_model.run(state, layers)

    def end_vision(self, state: VisionPass) -> torch.Tensor:
        """[n, image_seq_len, D_t]: the connector's output for a pass whose layers have all run."""
        return self.model.connector(self.model.vision_model.end(state))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D_t] token embeddings with `image_features` rows scattered, in order, into the `<image>` positions."""
        text = self.model.text_model
        embeds = text.embed_tokens(input_ids).to(text.norm.weight.dtype)  # the decoder's compute dtype (fast.py)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        n_tokens, n_features = int(is_image.sum()), image_features.shape[0]
        per_frame = self.config.image_seq_len
        if n_tokens != n_features:
            raise InputError(
                f"The text has {n_tokens} image tokens but the images give {n_features} image features "
                f"({n_features // per_frame} frames x {per_frame}); they must be equal. "
                "Build the prompt with the processor, and don't truncate it."
            )
        return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, keys: int) -> torch.Tensor:
        """Logits [n, V] for one new token per cache row: `tokens` [n] at `positions` [n] of rows 0..n-1, each
        attending its own keys 0..position; `keys` >= max(positions) + 1 bounds the positions the plain path reads.

        A model fused with the C++ kernels runs the whole step as one call (smolvlm/model/kernels.py); otherwise the
        text model's layers run one by one over keys 0..keys-1 under a mask."""
        embeds = self.embed(tokens[:, None])  # [n, 1, D]
        text = self.model.text_model
        weights = self.packed_decoder if cache.k.dtype == torch.float32 else None
        if weights is not None:
            config = text.config
            return kernels.load().decode_step(
                embeds[:, 0], positions, weights, text.norm.weight, self.lm_head.weight, self.lm_head.scale,
                text.rotary_emb.inv_freq, cache.k, cache.v,
                config.num_attention_heads, config.vocab_size, config.intermediate_size, config.rms_norm_eps,
            )  # fmt: skip
        positions = positions[:, None]  # [n, 1]
        mask = (torch.arange(keys, device=tokens.device) <= positions)[:, None, None, :]  # [n, 1, 1, S]
        hidden = text(embeds, positions, attn_mask=mask, cache=cache, cache_positions=positions)  # [n, 1, D]
        return self.lm_head(hidden[:, -1])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], with every argument meaning what it does in the reference forward.

        attention_mask [B, T] (1 = token, 0 = padding) is combined with the causal mask; position_ids default to
        arange(T) even with padding (pass cumsum(attention_mask) - 1 for left-padded rows, as generation does).
        """
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, tokens]; got shape {list(input_ids.shape)}")
        b, t = input_ids.shape
        features = None if pixel_values is None else self.get_image_features(pixel_values, pixel_attention_mask)
        embeds = self.embed(input_ids, features)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise InputError(
                    f"attention_mask has shape {list(attention_mask.shape)}; "
                    f"expected {list(input_ids.shape)} like input_ids"
                )
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]  # [B, 1, T, T]
        return self.lm_head(self.model.text_model(embeds, position_ids, mask))
