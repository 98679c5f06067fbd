"""The evolve recipe: its pydantic schema, YAML loading and model resolution."""
