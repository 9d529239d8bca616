// A consumer program built only from the installed headers, library and CMake config: trains a
// layer and checks what every correct batch normalization gives, then the free functions.
#include <batchnorm/batchnorm.hpp>
#include <cmath>
#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  const std::int64_t n = 64, c = 8;
  const batchnorm::Shape shape{n, c};
  std::vector<double> x(static_cast<std::size_t>(n * c));
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = 10.0 * static_cast<double>(i % c) + std::sin(static_cast<double>(i));
  }

  batchnorm::LayerOptions options;
  options.momentum = 0.5;
  batchnorm::BatchNormalization<double> layer(options);
  const std::vector<double> y = layer(x, shape, true);
  // Every feature of the output has mean 0 and variance var / (var + epsilon).
  for (std::int64_t f = 0; f < c; ++f) {
    double mean = 0.0, x_mean = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      mean += y[static_cast<std::size_t>(i * c + f)] / static_cast<double>(n);
      x_mean += x[static_cast<std::size_t>(i * c + f)] / static_cast<double>(n);
    }
    double var = 0.0, x_var = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      const auto k = static_cast<std::size_t>(i * c + f);
      var += (y[k] - mean) * (y[k] - mean) / static_cast<double>(n);
      x_var += (x[k] - x_mean) * (x[k] - x_mean) / static_cast<double>(n);
    }
    expect(std::fabs(mean) < 1e-12, "output mean is 0");
    expect(std::fabs(var - x_var / (x_var + 1e-3)) < 1e-12, "output variance");
    expect(std::fabs(layer.moving_mean()[static_cast<std::size_t>(f)] - 0.5 * x_mean) < 1e-12,
           "moving mean after one step");
  }
  // A constant upstream gradient moves no normalized output: dx = 0, dbeta = n.
  const std::vector<double> dx = layer.backward(std::vector<double>(x.size(), 1.0));
  for (double v : dx) expect(std::fabs(v) < 1e-12, "dx of a constant gradient is 0");
  expect(layer.gradients().beta == std::vector<double>(static_cast<std::size_t>(c), 64.0),
         "dbeta = sum(dy)");

  // The free functions on caller-owned float buffers: inference with unit statistics is the
  // identity up to 1 / sqrt(1 + epsilon).
  std::vector<float> xf(x.begin(), x.end()), yf(x.size());
  std::vector<float> mean(static_cast<std::size_t>(c), 0.0f), variance(mean.size(), 1.0f);
  batchnorm::Weights weights;
  weights.moving_mean = mean.data();
  weights.moving_variance = variance.data();
  batchnorm::infer_forward(batchnorm::contiguous_view(xf.data(), batchnorm::DType::float32, shape),
                           batchnorm::contiguous_view(yf.data(), batchnorm::DType::float32, shape),
                           batchnorm::Options{}, weights);
  for (std::size_t i = 0; i < xf.size(); ++i) {
    expect(std::fabs(yf[i] - xf[i] / std::sqrt(1.001f)) <= 1e-5f * (1.0f + std::fabs(xf[i])),
           "free-function inference");
  }

  std::printf("batchnorm %s consumer: %s\n", BATCHNORM_FOUND_VERSION, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
