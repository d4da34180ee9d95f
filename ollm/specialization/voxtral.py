"""Voxtral (audio encoder in front of a Mistral text decoder)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="voxtral",
        model_types=frozenset({"voxtral"}),
        pass_ids=("voxtral.audio-encoder-offload", "voxtral.chunked-mlp", "voxtral.layer-offload"),
    )
)
