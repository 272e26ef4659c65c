"""Op wrappers: validate, choose a variant, look up tile parameters, render, launch."""
