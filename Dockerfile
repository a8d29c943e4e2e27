# adaptive-vit for GPU clusters: CUDA PyTorch base image, the package installed, the CLI as entry point.
#   docker build -t adaptive-vit .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data/imagenet -v $PWD/runs:/work/runs \
#       adaptive-vit fit --config configs/cfvit_deit.yaml --data.init_args.root /data/imagenet
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /work
COPY pyproject.toml README.md ./
COPY adaptive_vit ./adaptive_vit
COPY configs ./configs
# torch comes from the base image (the package's range admits it); torchattacks without its
# pinned old requests.
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps torchattacks==3.5.1

ENTRYPOINT ["adaptive-vit"]
CMD ["--help"]
