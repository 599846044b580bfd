"""Communication only: mesh, context-parallel state passing, halo exchange, Ulysses attention."""
