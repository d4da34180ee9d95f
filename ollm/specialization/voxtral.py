"""Voxtral (audio encoder in front of a Mistral text decoder).

The decoder is a llama-shaped Mistral under ``language_model.model.layers``: it streams like
llama's, its MLPs chunk like llama's. The audio encoder (a Whisper-style tower, ``audio_tower``)
runs once per request, in that request's prefill: when the layers stream it is read then and
dropped after (``voxtral.audio-encoder-offload``) rather than held for the model's whole life.
"""

from ollm.specialization import SpecializationProvider, register

_PASSES = ("voxtral.audio-encoder-offload", "voxtral.chunked-mlp", "voxtral.layer-offload")

register(
    SpecializationProvider(
        name="voxtral",
        model_types=frozenset({"voxtral"}),
        pass_ids=_PASSES,
        implemented_passes=frozenset(_PASSES),
        chunked_projection_pass="voxtral.chunked-mlp",
        layer_streaming_pass="voxtral.layer-offload",
        on_demand_modules=("audio_tower",),
        on_demand_pass="voxtral.audio-encoder-offload",
    )
)
