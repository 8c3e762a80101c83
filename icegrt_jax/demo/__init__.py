"""The embedded default of ``icegrt demo``: generated data, a tiny tokenizer, a programmatic
annotator with simulated labelers, the pipeline's stages and its report (docs/demo.md)."""
