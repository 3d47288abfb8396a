"""The stages, one module each, entered by `run`, and the stage pattern they share (`lifecycle`)."""
