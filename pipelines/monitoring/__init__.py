"""Model monitoring: drift of a model's inputs, scores and alert rate against its training-time reference."""
