"""Embed stage: RGB frames and prompt texts -> L2-normalised float32 CLIP embeddings.

This is the only stage that touches torch, open_clip and ONNX Runtime, and it imports them only when it must: the
pixel preparation half (:class:`PixelSpec`, :func:`prepare_pixels`) is plain PIL + numpy so that decode workers run
it without loading torch, and an :class:`Encoder` on the ONNX runtime with its prompts cached never imports torch.

An :class:`Encoder` is identified by its ``encoder_id`` (architecture, weights identity, preprocessing; ``|int8``
for the int8 runtime): every embedding, cache entry and artifact downstream records it, and spaces are never mixed.

=============  ===========================================================================
module         what
=============  ===========================================================================
_config        defaults, model/device/runtime/threads resolution (no torch)
_pixels        :class:`PixelSpec`, :func:`prepare_pixels` (PIL + numpy)
_prepare       :func:`prepare` / :func:`prepare_chunks` (decode + pixels, shared by requests and audits),
               :class:`DecodeOptions`,
               :class:`EncoderSpec` (the option groups that travel)
_prompts       :class:`PromptCache`
_identity      weights identity and ``encoder_id`` (no torch)
_store         the export folders: manifest, sha256 check, lock
_export        the ONNX export and int8 quantisation, run in a child process
_onnx          the ONNX Runtime image tower
_torch         open_clip: the torch runtime, the export's source, the text tower
_encoder       :class:`Encoder`
_checkpoint    :func:`read_state_dict` (torch files as numpy), :func:`tag_encoder_id` (a tag's space, no weights),
               :func:`known_encoder_id` / :func:`encoder_id_matches` (what a policy's ``encoder:`` embeds into)
_verify        :func:`verify_int8`: what int8 changes on the user's images
=============  ===========================================================================
"""

from ._config import (DEFAULT_MODEL, DEFAULT_PRETRAINED, IDENTITY_VERSION, PRECISIONS, RUNTIMES, default_cache_dir,
                      resolve_device, resolve_encoder_args)
from ._checkpoint import encoder_id_matches, known_encoder_id, read_state_dict, tag_encoder_id
from ._encoder import Encoder, RuntimeFallbackWarning
from ._pixels import PixelSpec, prepare_pixels
from ._prepare import DecodeOptions, EncoderSpec, Prepared, prepare, prepare_chunks
from ._prompts import PromptCache
from ._verify import Int8Report, verify_int8

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DecodeOptions",
    "IDENTITY_VERSION",
    "PRECISIONS",
    "RUNTIMES",
    "Encoder",
    "EncoderSpec",
    "Int8Report",
    "PixelSpec",
    "Prepared",
    "PromptCache",
    "RuntimeFallbackWarning",
    "default_cache_dir",
    "encoder_id_matches",
    "known_encoder_id",
    "prepare",
    "prepare_chunks",
    "prepare_pixels",
    "read_state_dict",
    "resolve_device",
    "resolve_encoder_args",
    "tag_encoder_id",
    "verify_int8",
]
