"""Model definitions: the LLaMA decoder and its scalar-head variant."""
