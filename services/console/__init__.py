"""The web console: Models, Playground, Operations and Charts pages over the mesh's public APIs."""
