# Training image: docker run -v $PWD/data:/srv/data -v $PWD/models:/srv/models emotion-train experiment=full
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

WORKDIR /srv
COPY requirements-serve.txt requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY project.py ./
COPY training/ training/
# The CPU's capabilities decide the training precision and threads (training/runtime.py).
COPY handler/emotion_cpu.py handler/emotion_cpuinfo.py handler/
ENV WANDB_MODE=offline EMOTION_DATA_DIR=/srv/data/raw
ENTRYPOINT ["python", "-m", "training.train"]
CMD ["experiment=full"]
