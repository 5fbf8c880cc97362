# PLACEHOLDER: the gumbel_softmax owner replaces this file.
def gumbel_softmax(*a, **k):
    raise NotImplementedError


def one_hot_argmax(*a, **k):
    raise NotImplementedError
