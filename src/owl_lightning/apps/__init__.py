"""Applications on the library and the trainer: evaluation, OwlEval, the web pages, the official-weights
converter and the embedded-data builder."""
