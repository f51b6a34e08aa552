"""The PersRM training path: pair data, preference checkers, make-pairs, the trainer and the default recipe.

Only `trainer.py` imports the `[train]` extra (TRL, peft, datasets); the engine never imports this package.
"""
