"""Applications on the library and the trainer: evaluation, OwlEval, the web pages, the official-weights
converter and the embedded-data builder. Each names the extra that installs what it needs
(:func:`owl_lightning.extras.require`)."""
