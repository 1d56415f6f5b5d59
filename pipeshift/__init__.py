"""pipeshift: pipeline-parallel training for PyTorch that keeps itself balanced.

The four steps — profile, plan, codegen, train — live in the sub-packages of the same name
(``profiler``, ``optimizer``, ``codegen``, ``runtime``); each reads the previous step's files and
writes its own (see DESIGN.md).
"""

__version__ = "0.1.0"
