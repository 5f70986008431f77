"""services/evaluator."""
