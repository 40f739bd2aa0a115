"""Media: loading bytes from a reference, decoding, InternVL tiling and normalisation."""
