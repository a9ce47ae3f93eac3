"""jepa4rec-dist: distributed pretraining of text-based sequential recommenders (JEPA4Rec, RecFormer)."""

import sys

__version__ = "0.1.0"

# transformers' Auto modules -> what registers our classes with them (jepa4rec_dist/hf.py)
_AUTO_MODULES = {"transformers.models.auto.configuration_auto": "register_config",
                 "transformers.models.auto.modeling_auto": "register_model"}


def _register(module_name: str) -> None:
    from jepa4rec_dist import hf

    getattr(hf, _AUTO_MODULES[module_name])()


class _RegisterOnImport:
    """A `sys.meta_path` entry that finds nothing itself: when one of transformers' Auto modules is imported, it
    wraps that module's loader so that, once the module has run, our classes are registered with it."""

    def __init__(self, pending: set[str]):
        self.pending = pending

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def done(self, fullname: str) -> None:
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


class _RegisteringLoader:
    """The module's own loader, with our registration after `exec_module`."""

    def __init__(self, loader, finder: _RegisterOnImport):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._finder.done(module.__name__)
        _register(module.__name__)

    def __getattr__(self, name):  # get_data, get_filename, is_package, ...: the wrapped loader's
        return getattr(self._loader, name)


def _register_with_transformers() -> None:
    """Exports are Hugging Face models of model_type "jepa4rec": after `import jepa4rec_dist`,
    AutoConfig / AutoModel / AutoTokenizer.from_pretrained(export) work (jepa4rec_dist/hf.py).

    Registering needs transformers' configuration classes, which import torch (~1.5 s): so it happens when
    transformers' Auto modules are first imported (at once for those already imported), and `import
    jepa4rec_dist` itself, `jepa4rec --help` and the config layer stay free of torch and transformers."""
    pending = set()
    for name in _AUTO_MODULES:
        if name in sys.modules:
            _register(name)
        else:
            pending.add(name)
    if pending:
        sys.meta_path.insert(0, _RegisterOnImport(pending))


_register_with_transformers()
