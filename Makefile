PYTHON ?= python
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-slow test-gpu lint demo clean

install:  ## install medvlp (editable) with the test tools
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the default suite (CPU, < 15 min on 2 cores)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-slow:  ## tests marked slow (exit code 5 = none selected is not an error)
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-gpu:  ## tests that need a CUDA GPU
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check medvlp tests

demo:  ## write the synthetic datasets to demo_data/ and train CLIP on the 2D one
	medvlp demo --out demo_data
	medvlp fit --method clip

clean:
	rm -rf runs .cache build *.egg-info
