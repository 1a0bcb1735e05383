# Two commands do everything on a fresh machine:
#   make demo   - set up the pinned host, show identity transfer on the pack's own trained model through a real
#                 ComfyUI server (contact sheet + each picture's measured errors against its reference; under 2 minutes
#                 after setup)
#   make test   - set up both pinned hosts and run the tests (full suite on 0.3.75, node tests on 0.3.52)
HOST ?= 0.3.75
OLD_HOST ?= 0.3.52
py = .hosts/$(1)/venv/bin/python
comfy = $(CURDIR)/.hosts/$(1)/ComfyUI

.PHONY: setup demo demo-sd15 test test-main test-old bench synthetic synthetic-flux synthetic-token-budget clean
setup:
	bash scripts/setup_host.sh $(HOST)

demo: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) scripts/demo.py --host $(HOST)

# the SD1.5 plumbing check: random-weight SD1.5 checkpoint, untrained adapter (the picture is noise)
demo-sd15: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) scripts/demo_sd15.py --host $(HOST)

# both hosts' suites on two lanes, one per core (scripts/run_tests.sh says why and how); test-main / test-old run one of them
test: setup
	bash scripts/setup_host.sh $(OLD_HOST)
	MAIN_HOST=$(HOST) OLD_HOST=$(OLD_HOST) bash scripts/run_tests.sh both

# The browser tests (tests/test_browser*.py: the real frontend in Debian's chromium via Playwright, installed by
# setup_host.sh) run only on host 0.3.75: its pinned frontend (1.32.9) is the one the js/ extension targets.
test-main: setup
	MAIN_HOST=$(HOST) OLD_HOST=$(OLD_HOST) bash scripts/run_tests.sh main

# the second host: the pack must import (through ComfyUI's own loader, in the e2e test) and pass its node tests
test-old:
	bash scripts/setup_host.sh $(OLD_HOST)
	MAIN_HOST=$(HOST) OLD_HOST=$(OLD_HOST) bash scripts/run_tests.sh old

# speed: IDFusion step cost vs the plain UNet (CPU small config; see benchmarks/README.md for GPU)
bench: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) benchmarks/bench_unet.py

# rebuild the shipped model (models/), its example references and its report (docs/synthetic/) from scratch; measured
# times are in models/README.md
synthetic: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) benchmarks/synthetic/run.py --scale cpu

# the DiT family: the same domain, instrument and evaluation on ComfyUI's Flux class at a tiny width (issue 19); ships
# models/synthetic_faces_flux.safetensors, its adapter and docs/synthetic/report_flux-cpu.md
synthetic-flux: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) benchmarks/synthetic/run.py --scale flux-cpu

# after `make synthetic`: an adapter trained with pooled reference tokens, compared on the same pictures (report section 5)
synthetic-token-budget: setup
	COMFYUI_PATH=$(call comfy,$(HOST)) $(call py,$(HOST)) benchmarks/synthetic/run.py --scale cpu --stage token-budget

clean:
	rm -rf .hosts
