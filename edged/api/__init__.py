"""The local prediction API: Open Inference Protocol over HTTP on a Unix socket."""
