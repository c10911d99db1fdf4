// The edgevlm-android library: a bundle loader and VLM pipeline on ONNX Runtime for Android. Not built in CI.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

val onnxruntimeVersion: String by project
val onnxruntimeExtensionsVersion: String by project

android {
    namespace = "io.edgevlm.android"
    compileSdk = 34
    defaultConfig {
        minSdk = 26                 // java.nio.file.Files (symbolic-link checks in Bundle.kt)
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    sourceSets["main"].java.srcDirs("src/main/kotlin")
}

dependencies {
    api("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
    api("com.microsoft.onnxruntime:onnxruntime-extensions-android:$onnxruntimeExtensionsVersion")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}
