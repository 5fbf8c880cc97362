"""Public functions over the compiled ops: fake kernels and autograd are registered beside each."""
