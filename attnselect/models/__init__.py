"""Reference models assembled from the library's public parts."""

from .itself import ITSELF, ITSELFConfig, build_clip, interpolate_pos_embed, load_clip_weights, read_state_dict

__all__ = ["ITSELF", "ITSELFConfig", "build_clip", "interpolate_pos_embed", "load_clip_weights", "read_state_dict"]
