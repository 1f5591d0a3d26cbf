"""The finishing stage: temperature scaling and the guard's fit, the int8 gate, evaluation and split reports."""
