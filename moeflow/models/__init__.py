"""Reference models built from moeflow layers."""

from moeflow.models.decoder import DecoderConfig, MoEDecoder

__all__ = ["DecoderConfig", "MoEDecoder"]
