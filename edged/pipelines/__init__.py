"""Continuous inference: sources, preprocessing, decoders and sinks around the model manager."""
