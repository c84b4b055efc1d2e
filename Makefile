PYTHON ?= python
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-slow test-gpu bench-gpu lint demo sweep reproduce clean

install:  ## install medvlp (editable) with the test tools
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the default suite (CPU, < 10 min on 2 cores)
	$(PYTHON) -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow:  ## tests marked slow (exit code 5 = none selected is not an error)
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-gpu:  ## tests that need a CUDA GPU
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS)

# On a CUDA machine, offline: the gpu tests, then medvlp bench (fp32 / bf16 x eager / compiled, interleaved) for
# a CLIP step shaped like ViT-B/16 + BERT-base at 224 px, MGCA's ViT-B/16 recipe and HLIP's CT-RATE recipe at
# their per-GPU batches, random weights (no hub): one Markdown table, $(OUT)/bench-gpu.md.
BERT_BASE = method.text_encoder.model=tiny "method.text_encoder.config_overrides={hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}"
BENCH = $(PYTHON) -m medvlp.cli bench --matrix --steps 8 --warmup 3 --markdown $(OUT)/bench-gpu.md
bench-gpu:  ## gpu tests + medvlp bench of clip / mgca / hlip on the GPU: $(OUT)/bench-gpu.md
	mkdir -p $(OUT) && rm -f $(OUT)/bench-gpu.md
	$(PYTHON) -m pytest -q -m gpu $(PYTEST_ARGS) 2>&1 | tail -5 | tee $(OUT)/gpu-tests.txt
	$(BENCH) --config configs/experiment/clip_vit_mimic.yaml --data demo_cxr data.root=demo data.image_size=224 data.channels=3 \
		method.image_encoder.pretrained=false $(BERT_BASE) --batch-size 128 --workers 8
	$(BENCH) --config configs/experiment/mgca_vit_mimic.yaml --data demo_cxr data.root=demo \
		method.image_encoder.pretrained=false $(BERT_BASE) --batch-size 72 --workers 8
	$(BENCH) --config configs/experiment/hlip_ctrate.yaml --data demo_ct data.root=demo \
		method.image_encoder.pretrained=false 'method.image_encoder.inflate_from=""' $(BERT_BASE) --batch-size 16 --workers 8
	cat $(OUT)/bench-gpu.md

lint:
	$(PYTHON) -m ruff check medvlp tests

demo:  ## write the synthetic datasets to demo_data/ and train CLIP on the 2D one
	medvlp demo --out demo_data
	medvlp fit --method clip

# make sweep METHODS="clip mgca g2d" TASKS="classification segmentation zeroshot" FRACTIONS="0.01 0.1 1" SEEDS="0 1 2"
# Real data: ROOTS="chexpert=/data/chexpert siim_pneumothorax=/data/siim" PRETRAIN_DATA=mimic_cxr PRETRAIN_ROOT=/data/mimic.
# More flags (e.g. --max-epochs 10, --pretrain-overrides ...) go in SWEEP_ARGS; python -m medvlp.sweep --help lists them.
METHODS ?= clip mgca
TASKS ?= classification segmentation
FRACTIONS ?= 0.1 1
SEEDS ?= 0
OUT ?= results
RUNS ?= runs/sweep
PRETRAIN_STEPS ?= 200
PRETRAIN_DATA ?=
PRETRAIN_ROOT ?=
ROOTS ?=
SWEEP_ARGS ?=

sweep:  ## pre-train METHODS where needed, evaluate TASKS x FRACTIONS x SEEDS, write $(OUT)/summary.{csv,md,png}; resumable
	$(PYTHON) -m medvlp.sweep --methods $(METHODS) --tasks $(TASKS) --fractions $(FRACTIONS) --seeds $(SEEDS) \
		--out $(OUT) --runs $(RUNS) --pretrain-steps $(PRETRAIN_STEPS) \
		$(if $(PRETRAIN_DATA),--pretrain-data $(PRETRAIN_DATA)) $(if $(PRETRAIN_ROOT),--pretrain-root $(PRETRAIN_ROOT)) \
		$(if $(ROOTS),--roots $(ROOTS)) $(SWEEP_ARGS)

# make reproduce PAPER=g2d ROOTS="siim_pneumothorax=/data/siim rsna_pneumonia=/data/rsna ..." RUN=runs/g2d-...
# Without ROOTS: the synthetic stand-ins at small settings (and, without RUN, a demo pre-training run first).
# PAPER=mgca|hlip: one run per model, e.g. RUN="resnet50=runs/mgca-r50-... vit=runs/mgca-vit-...".
PAPER ?= g2d
RUN ?=
reproduce:  ## a paper's tables under its protocol preset, beside its numbers: results/$(PAPER)/table.md
	$(PYTHON) -m medvlp.cli reproduce --paper $(PAPER) --out $(OUT)/$(PAPER) $(foreach r,$(RUN),--run $(r)) \
		$(if $(ROOTS),--roots $(ROOTS),--demo)

clean:
	rm -rf runs .cache build *.egg-info
