"""Every public function and class of the documented modules has a docstring, with an "Args" section
where it takes arguments and a "Returns" section where it returns something (a `return <value>` in
its body); public methods of public classes too (properties and dunder methods excepted)."""
import ast
import importlib
import inspect
import textwrap

import pytest

MODULES = ["dalle_fast", "dalle_fast.nn", "dalle_fast.models", "dalle_fast.models.dalle", "dalle_fast.models.dvae",
           "dalle_fast.models.convert", "dalle_fast.generate", "dalle_fast.data", "dalle_fast.checkpoint",
           "dalle_fast.tokenizer", "dalle_fast.clip"]


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items() if not n.startswith("_")
                 and getattr(obj, "__module__", None) == module.__name__]
    return [n for n in names if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))]


def returns_value(fn):
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    top = tree.body[0]
    nested = {id(n) for node in ast.walk(top) if node is not top
              and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for n in ast.walk(node)}
    return any(isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom)) and id(n) not in nested
               and getattr(n, "value", None) is not None
               and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in ast.walk(top))


def takes_args(fn):
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
    return bool(params)


def problems_of(qualname, fn, doc=None):
    doc = doc if doc is not None else inspect.getdoc(fn)
    if not doc:
        return [f"{qualname}: no docstring"]
    out = []
    if takes_args(fn) and "Args" not in doc:
        out.append(f"{qualname}: takes arguments, docstring has no Args")
    if returns_value(fn) and "Returns" not in doc and "Yields" not in doc:
        out.append(f"{qualname}: returns a value, docstring has no Returns")
    return out


def public_callables():
    seen = set()
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{obj.__module__}.{name}", obj


def problems(qualname, obj):
    if inspect.isfunction(obj):
        return problems_of(qualname, obj)
    out = []
    doc = inspect.getdoc(obj) if obj.__doc__ else None
    if not doc:
        out.append(f"{qualname}: no class docstring")
    init = obj.__dict__.get("__init__")
    if init is not None and inspect.isfunction(init) and takes_args(init):
        if "Args" not in (doc or "") + (init.__doc__ or ""):
            out.append(f"{qualname}: its constructor takes arguments, no Args in the class or __init__ docstring")
    for name, member in obj.__dict__.items():
        if name.startswith("_") or isinstance(member, property):
            continue
        fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if inspect.isfunction(fn):
            out += problems_of(f"{qualname}.{name}", fn)
    return out


@pytest.mark.parametrize("qualname,obj", list(public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_callable_is_documented(qualname, obj):
    found = problems(qualname, obj)
    assert not found, "\n".join(found)
