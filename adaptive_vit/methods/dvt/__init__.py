"""DVT: a cascade of transformers with growing token grids, feature and relationship reuse."""
