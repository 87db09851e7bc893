"""The torch side of the embed stage: open_clip loading, the image forward torch runs and ONNX exports, the text tower.

Imported only when torch is needed: the torch runtime, an export (in its own process), or a prompt-cache miss.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..artifacts import sha256_bytes
from ..errors import ModelLoadError
from ._hub import hub_offline_reason, local_weights_error, not_in_hub_cache, quiet_hub
from . import _identity
from ._identity import KnownWeights, recognised_weights
from ._pixels import PixelSpec

__all__ = ["PixelsToEmbedding", "TorchModel"]


class PixelsToEmbedding(torch.nn.Module):
    """``(N, S, S, 3)`` uint8 pixels -> ``(N, D)`` L2-normalised float32 embeddings.

    The one image forward: the torch runtime runs it and the ONNX export traces it, so the two cannot drift apart.
    ``x * scale - shift`` is ``ToTensor()`` then ``Normalize(mean, std)``.
    """

    def __init__(self, model: Any, spec: PixelSpec) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift
        feats = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(feats, dim=-1)


def _encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``encode_text`` with the context trimmed to the longest prompt.

    CLIP's text tower is causal and pools at the end-of-text token, so positions after the longest prompt never
    influence any output: trimming gives the same embeddings as padding to 77, several times faster.
    """
    import open_clip
    from open_clip.transformer import text_global_pool

    m = model
    causal = getattr(m, "attn_mask", None) is not None
    if not (isinstance(m, open_clip.CLIP) and causal and getattr(m, "text_pool_type", "") in {"argmax", "eos"}):
        return m.encode_text(tokens)
    length = int((tokens != 0).sum(dim=1).max().item())
    length = max(1, min(length, tokens.shape[1]))
    t = tokens[:, :length]
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(t).to(cast) + m.positional_embedding[:length].to(cast)
    x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
    x = m.ln_final(x)
    x = text_global_pool(x, t, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
    return x


def _from_hub(open_clip: Any, model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip will fetch these weights from the Hugging Face hub (an ``hf-hub:`` name or a hub tag)."""
    if model_name.startswith("hf-hub:"):
        return True
    if model_name.startswith("local-dir:") or not pretrained:
        return False
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    return bool(cfg.get("hf_hub")) and "file" not in cfg


def _is_torchscript(data: bytes) -> bool:
    """Whether ``data`` is a TorchScript archive (OpenAI's CLIP ``.pt`` files), as ``torch.load`` tells them apart."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def _recognised_bytes(model_name: str, pretrained: str | None) -> tuple[KnownWeights, bytes] | None:
    """A recognised checkpoint file (``recognised_weights``) and its bytes, read once and checked against its sha256.

    The weights load from these bytes, never from the path again, so a file swapped after it was recognised (or
    hashed here) is never what loads, nor what runs: OpenAI's files are TorchScript archives, which only
    ``weights_only=False`` reads, allowed for bytes whose sha256 is a published one (never for a file recognised
    by the hub cache's record).
    """
    if model_name.startswith(("local-dir:", "hf-hub:")) or not pretrained:
        return None
    known = recognised_weights(model_name, pretrained)
    if known is None:
        return None
    with open(pretrained, "rb") as f:
        data = f.read()
    if sha256_bytes(data) != known.sha256:
        raise ModelLoadError(f"{pretrained} changed after it was recognised as {known.model} {known.pretrained} "
                             "weights: load it again")
    if _is_torchscript(data) and known.sha256 not in _identity.known_weights():
        raise ModelLoadError(f"{pretrained} is a TorchScript archive, which runs code when loaded: safeclip loads "
                             "one only when its sha256 is that of a published file (known_weights.json)")
    return known, data


def _state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint's bytes, read as open_clip's ``load_state_dict`` reads the file ``name``.

    Only for bytes :func:`_recognised_bytes` checked: a TorchScript archive among them is a published one.
    """
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        sd: Any = load(data)
    elif _is_torchscript(data):
        sd = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
    else:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{name} holds no state_dict")
    if next(iter(sd)).startswith("module"):
        sd = {k[7:]: v for k, v in sd.items()}
    return dict(sd)


def _load_state_dict(model: Any, sd: dict[str, torch.Tensor]) -> None:
    """``open_clip.load_checkpoint`` on a state_dict in memory rather than a path: its conversions, then a strict
    load."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        ref = getattr(model, key, None)
        if key in sd and ref is not None and ref.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(ref.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)  # newer transformers no longer expect it
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    model.load_state_dict(sd, strict=True)


def _load_kwargs(open_clip: Any, model_name: str, pretrained: str | None,
                 known: KnownWeights | None) -> dict[str, Any]:
    """``create_model`` arguments beyond the weights: a tag's QuickGELU and, for a published checkpoint file
    (``known``), the preprocessing its tag's load has and a file's lacks.

    open_clip applies a tag's ``quick_gelu`` only as a warning; the weights were trained with QuickGELU, so it is
    forced.
    """
    if model_name.startswith(("local-dir:", "hf-hub:")) or not pretrained:
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, known.pretrained if known else pretrained) or {}
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu"))}
    if known is not None:
        kwargs["force_preprocess_cfg"] = cfg
    return kwargs


class TorchModel:
    """An open_clip model (both towers) in eval mode, frozen, on one device.

    A published checkpoint file (see :mod:`safeclip.embed._identity`) loads as its pretrained tag loads: the same
    architecture config, QuickGELU setting and preprocessing, so the same model and ``pixel_spec``.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, *, device: str = "cpu",
                 precision: str = "fp32") -> None:
        import open_clip

        self.device = device
        self.precision = precision
        tried = f"{model_name} {pretrained}" if pretrained and not model_name.startswith("local-dir:") else model_name
        offline = hub_offline_reason() if _from_hub(open_clip, model_name, pretrained) else None
        cache_dir = os.environ.get("SAFECLIP_WEIGHTS_DIR")
        recognised = _recognised_bytes(model_name, pretrained)
        kwargs = _load_kwargs(open_clip, model_name, pretrained, recognised[0] if recognised else None)
        try:
            with quiet_hub(offline=offline is not None), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated")
                if recognised is None:
                    model = open_clip.create_model(
                        model_name,
                        pretrained=None if model_name.startswith(("local-dir:", "hf-hub:")) else pretrained,
                        device=device,
                        precision="fp32",
                        require_pretrained=True,
                        cache_dir=cache_dir,
                        **kwargs,
                    )
                else:  # the bytes that were checked, not the path again
                    model = open_clip.create_model(model_name, pretrained=None, device=device, precision="fp32",
                                                   **kwargs)
                    sd = _state_dict(recognised[1], str(pretrained))
                    recognised = None  # the bytes are no longer needed: free them before the weights are copied
                    _load_state_dict(model, sd)
                    del sd
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except Exception as e:  # open_clip raises RuntimeError/ValueError/OSError/HTTP errors alike
            if offline is not None and not_in_hub_cache(e):
                raise local_weights_error(f"cannot download the CLIP weights {tried}: {offline} and they are not in "
                                          "the local hub cache", model_name, pretrained) from e
            raise local_weights_error(f"could not load the CLIP weights {tried}: {type(e).__name__}: "
                                      f"{str(e)[:300]}", model_name, pretrained) from e
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.pixel_spec = self._pixel_spec()
        self.image = PixelsToEmbedding(model, self.pixel_spec).to(device).eval()
        with torch.inference_mode():
            self.logit_scale = float(model.logit_scale.exp().item())

    def _pixel_spec(self) -> PixelSpec:
        visual = self.model.visual
        return PixelSpec.from_preprocess_cfg(getattr(visual, "preprocess_cfg", {}) or {},
                                             getattr(visual, "image_size", 224))

    def _autocast(self) -> Any:
        if self.precision in {"fp32", "int8"}:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def embed_pixels(self, pixels: np.ndarray, batch_size: int, out: np.ndarray, *,
                     fixed_shape: bool | None = None) -> None:
        """Embed ``(N, S, S, 3)`` uint8 pixels into ``out`` ``(N, D)``.

        ``fixed_shape`` (default: on CUDA) pads a short last batch to ``batch_size``: the GPU's kernels are chosen
        by shape, so one shape gives an image the same bits in any batch, at almost no cost on a GPU. On a CPU
        padding costs the forward of the padding, and torch eager differs only for a batch of one."""
        on_cuda = self.device.startswith("cuda")
        pad = on_cuda if fixed_shape is None else fixed_shape
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(pixels), batch_size):
                part = np.ascontiguousarray(pixels[i:i + batch_size])
                n = len(part)
                if pad and n < batch_size:
                    part = np.concatenate([part, np.zeros((batch_size - n, *part.shape[1:]), part.dtype)])
                chunk = torch.from_numpy(part)
                if on_cuda:
                    chunk = chunk.pin_memory()
                feats = self.image(chunk.to(self.device, non_blocking=on_cuda))
                out[i:i + n] = feats[:n].cpu().numpy()

    def reference(self, pixels: np.ndarray) -> np.ndarray:
        """The fp32 forward of one batch, what an export is verified against."""
        with torch.inference_mode():
            return self.image(torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)).cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` L2-normalised float32 text embeddings, no cache."""
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), 256):
                tokens = self.tokenizer(list(texts[i:i + 256])).to(self.device)
                feats = _encode_text_trimmed(self.model, tokens).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)
