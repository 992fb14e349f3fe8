# The appliance's EC2 image: Ubuntu (or AWS's Deep Learning Base GPU AMI) with the NVIDIA driver,
# NGINX, certbot, this project and vLLM in a virtualenv, the systemd units and a host firewall.
#
#   packer init packer.pkr.hcl
#   packer build -var region=eu-west-1 -var model=Qwen/Qwen2.5-7B-Instruct packer.pkr.hcl
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
  default     = "g6.xlarge"
  description = "Build instance; a GPU type, so the driver is installed and checked on real hardware."
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
  default     = "ubuntu-24.04"
  description = "ubuntu-24.04 (Canonical's image) or dlami (AWS's Deep Learning Base GPU AMI, driver included)."

  # Both are Ubuntu 24.04: the project needs Python 3.11 or newer, and the lock is for 3.12.
  validation {
    condition     = contains(["ubuntu-24.04", "dlami"], var.base_image)
    error_message = "The base_image must be ubuntu-24.04 or dlami."
  }
}

variable "vllm_version" {
  type        = string
  default     = "0.32.0"
  description = "The vLLM release; it must match the one pinned in ami/requirements-vllm.lock."
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

  # Canonical's account owns the Ubuntu images; "amazon" owns the Deep Learning AMIs.
  base_images = {
    "ubuntu-24.04" = {
      owners = ["099720109477"]
      name   = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
    }
    "dlami" = {
      owners = ["amazon"]
      name   = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"
    }
  }
  base = local.base_images[var.base_image]

  # What the image needs from this checkout; virtualenvs, caches and .run/ stay behind.
  source_paths = ["pyproject.toml", "README.md", "proxy", "server", "nginx", "systemd", "ami", "scripts", "observability"]
}

source "amazon-ebs" "appliance" {
  region          = var.region
  ami_regions     = var.ami_regions
  instance_type   = var.instance_type
  ami_name        = "inference-appliance-${local.timestamp}"
  ami_description = "Inference appliance: NGINX, appliance-proxy and vLLM ${var.vllm_version}"
  ssh_username    = "ubuntu"

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
    vllm_version = var.vllm_version
    base_image   = var.base_image
    model        = var.model
  }
}

build {
  sources = ["source.amazon-ebs.appliance"]

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo -E env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "NVIDIA_DRIVER_BRANCH=${var.nvidia_driver_branch}",
      "DEBIAN_FRONTEND=noninteractive",
    ]
    scripts = [
      "${path.root}/ami/10-packages.sh",
      "${path.root}/ami/20-nvidia.sh",
    ]
  }

  # A new driver (or kernel) loads on the next boot; what follows checks it on the GPU.
  provisioner "shell" {
    inline            = ["sudo systemctl reboot"]
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
      "VLLM_VERSION=${var.vllm_version}",
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
